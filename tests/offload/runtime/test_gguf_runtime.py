"""A GGUF file runs like any checkpoint: budgets, tiers, policies, predictors and batching give the tokens of a fully
resident run; `offload run` / `chat` / `serve` read its embedded tokenizer and chat template; `offload info` names
the types of every tensor group."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

import offload
from cli.main import app as cli_app
from offload.experts.kernels.linear import BlockLinear
from tests.gguf_checkpoints import experts_as, write_gguf
from tests.native import assert_native_close_to_exact
from tests.offload.checkpoint.test_families_2026 import _make
from tests.offload.checkpoint.test_gguf_vocab import CORPUS, SPECIALS, _bpe_kv
from tests.serve_process import start_server, stop_server

PROMPTS = ["def f(x):", "class A:\n", "import os", "x = [1, 2", "# note: ünï 🚀", "while True:"]


def write_tiny_gguf(root: Path) -> Path:
    """A tiny Qwen3-MoE with a byte-level BPE vocabulary, Q4_0 experts and Q8_0 attention, tokenizer and chat
    template in the file (what docs/gguf.md's examples run on, too)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.offload.checkpoint.test_gguf_vocab import QWEN2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kv = _bpe_kv(tok)
    src = _make("qwen3_moe", root / "src", vocab_size=len(kv["tokenizer.ggml.tokens"]), hidden_size=64,
                moe_intermediate_size=64, head_dim=16, bos_token_id=kv["tokenizer.ggml.bos_token_id"],
                eos_token_id=kv["tokenizer.ggml.eos_token_id"], pad_token_id=0)

    def vocab(w):
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("qwen2"), w.add_token_list(kv["tokenizer.ggml.tokens"])
        w.add_token_types(kv["tokenizer.ggml.token_type"]), w.add_token_merges(kv["tokenizer.ggml.merges"])
        w.add_chat_template(kv["tokenizer.chat_template"])

    path = root / "tiny-Q4_0.gguf"
    write_gguf(src, path, "qwen3_moe", types=experts_as("Q4_0", "Q8_0"), vocab=vocab)
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-run"))


def test_budgets_tiers_policies_predictors_and_batching_give_the_resident_tokens(gguf_file):
    full = offload.from_pretrained(gguf_file, device="cpu", dtype="float32")
    want = [c.token_ids for c in full.generate_many(PROMPTS, max_new_tokens=6, batch_size=3)]
    for options in (dict(expert_budget=1, policy="lfu"), dict(expert_budget=3, predictor="pregate", offload_to="ram")):
        model = offload.from_pretrained(gguf_file, device="cpu", dtype="float32", **options)
        for scheduler in ("fifo", "expert-aware"):
            got = model.generate_many(PROMPTS, max_new_tokens=6, batch_size=4, scheduler=scheduler)
            assert [c.token_ids for c in got] == want, (options, scheduler)
        assert model.stats.total.misses > 0


def test_transformers_own_gguf_loader_is_a_second_oracle(gguf_file):
    """transformers reads the same file (its ``gguf_file=`` path maps the names and config and dequantizes with
    ggml-org's package): offload with float32 activations computes from the same dequantized values, so logits agree
    to float32 summation order (1e-4 on logits of scale ~7) and greedy tokens are identical. transformers 5.x maps
    ``feed_forward_length`` only and ignores ``expert_feed_forward_length``, so the experts' width is passed."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                           dtype=torch.float32, moe_intermediate_size=64).eval()
    model = offload.from_pretrained(gguf_file, device="cpu", dtype="float32", quant_activations="float32")
    ids = torch.tensor([model.tokenizer.encode(PROMPTS[0]).ids])
    with torch.no_grad():
        reference = hf(ids).logits
        expected = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)), reference, atol=1e-4, rtol=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[]), expected)


def test_the_files_quantized_lm_head_and_attention_compute_from_their_blocks(gguf_file):
    """With int8 activations (the CPU's default) the file's Q8_0 lm_head and attention projections stay in their blocks
    and run on the Q8_0 kernel, as its experts do; with float32 activations they are dequantized at load. The two
    models agree as every native GGUF model must agree with its exact twin (tests/native.py's tolerances)."""
    native = offload.from_pretrained(gguf_file, device="cpu")
    exact = offload.from_pretrained(gguf_file, device="cpu", dtype="float32", quant_activations="float32")
    attention = native.model.layers[0].attention
    for weight in (native.model.lm_head, attention.q, attention.k, attention.v, attention.o):
        assert isinstance(weight, BlockLinear) and weight.kind == "Q8_0"
    assert isinstance(exact.model.lm_head, torch.Tensor) and isinstance(exact.model.layers[0].attention.q, torch.Tensor)
    assert_native_close_to_exact(gguf_file, native, exact, [0])


def test_offload_info_names_the_types(gguf_file):
    result = CliRunner().invoke(cli_app, ["info", str(gguf_file)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "qwen3_moe (Qwen3MoeForCausalLM)" in text and "gguf (gate Q4_0, up Q4_0, down Q4_0)" in text
    assert "attention Q8_0" in text and "fits in RAM" in text


def test_run_chat_and_serve_read_the_embedded_tokenizer_and_template(gguf_file, tmp_path):
    model = offload.from_pretrained(gguf_file, device="cpu")
    alone = model.generate_text(PROMPTS[0], max_new_tokens=5)
    result = CliRunner().invoke(cli_app, ["run", str(gguf_file), PROMPTS[0], "--max-new-tokens", "5",
                                          "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPTS[0] + alone + "\n"
    result = CliRunner().invoke(cli_app, ["run", str(gguf_file), "hi", "--chat", "--max-new-tokens", "4",
                                          "--device", "cpu"])
    assert result.exit_code == 0, result.output
    proc, base = start_server(gguf_file, tmp_path / "serve.log")
    try:
        body = {"model": str(gguf_file), "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
        reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == alone
    finally:
        stop_server(proc)
    assert torch.equal(model.encode(PROMPTS[4])[0], torch.tensor(model.tokenizer.encode(PROMPTS[4]).ids))
