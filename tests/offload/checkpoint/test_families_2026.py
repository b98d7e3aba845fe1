"""The 2026 families beyond the plain parity tests (test_model.py runs those for every family): their
released formats (gpt-oss's MXFP4, DeepSeek's FP8 blocks) read as stored and computing what transformers
computes on the dequantized weights; MLA's cache holding only the latent; pre-gating ranking experts by
each router's own rule; the released config.json files at real scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import offload
from offload.checkpoint.families import family_for_config
from offload.experts.formats.fp8 import Fp8BlockFormat
from offload.experts.formats.mxfp4 import Mxfp4Format, Mxfp4Matrix, mxfp4_dequantize
from offload.experts.layouts import DenseMatrix
from offload.model.kv import KVCache
from tests.native import assert_native_close_to_exact
from tests.offload.model.test_forward import _min_gap, _prompts
from tests.paths import DATA
from tests.quant_checkpoints import write_dequantized, write_fp8, write_mxfp4
from tests.tiny_models import family_configs

CONFIGS = DATA / "configs"
NEW_TOKENS = 8


def _make(family: str, out: Path, **changes) -> Path:
    import transformers

    from tests.tiny_models import _randomize_zero_starts

    name, kwargs = family_configs()[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**{**kwargs, **changes})).eval()
    _randomize_zero_starts(model, 0)
    model.save_pretrained(out)
    return out


def _reference(path, ids, mask):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores, 1), ref(ids, attention_mask=mask).logits


def _check_parity(qdir, deq, **options):
    for batch in (1, 3):
        ids, mask = _prompts(batch)
        tokens, scores, logits = _reference(deq, ids, mask)
        assert _min_gap(scores, tokens) > 1e-3
        for budget, tier in ((1, "disk"), ("25%", "ram"), ("100%", "disk")):
            model = offload.from_pretrained(qdir, device="cpu", expert_budget=budget, offload_to=tier, **options)
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                              pad_token_id=0), tokens), (budget, tier, batch)
            real = mask.bool()
            # float32 on both sides from the same dequantized values: only the summation order differs
            torch.testing.assert_close(model(ids, attention_mask=mask)[real], logits[real], atol=1e-4, rtol=0)


def test_gpt_oss_mxfp4_as_released(tmp_path):
    src = _make("gpt_oss", tmp_path / "src", intermediate_size=32)  # MXFP4 groups of 32 inputs on both sides
    state = write_mxfp4(src, tmp_path / "q")
    _check_parity(tmp_path / "q", write_dequantized(src, tmp_path / "deq", state), quant_activations="float32")
    model = offload.from_pretrained(tmp_path / "q", device="cpu", offload_to="ram", quant_activations="float32")
    assert isinstance(model.plan.expert_format, Mxfp4Format)
    # the RAM tier keeps 4.25 bits per weight: (16 bytes + 1 scale) per 32 weights, plus a float32 bias per row
    h = i = 32
    (host,) = model.cache.mover.store.native_formats  # every expert of the RAM tier in one layout
    assert all(isinstance(m, Mxfp4Matrix) for m in host.matrices)
    assert host.nbytes == pytest.approx(3 * i * h * 17 / 32 + 4 * (2 * i + h), abs=3 * 64)
    # float32 activations: a CPU slot holds the expert dequantized once, in the compute dtype (exact)
    slot = model.cache.mover.slot_layout
    assert all(isinstance(m, DenseMatrix) and m.w.dtype == torch.float32 for m in slot.matrices)
    # int8 activations (the default): the slot holds the RAM tier's MXFP4 bytes and the kernel computes from them
    native = offload.from_pretrained(tmp_path / "q", device="cpu")
    assert native.cache.mover.slot_layout.same_format(host) and native.cache.slot_nbytes < slot.nbytes
    layers = [n for n, moe in enumerate(native.spec.moe_layers) if moe]
    assert_native_close_to_exact(tmp_path / "q", native, model, layers)


def test_mxfp4_dequantizes_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (2, 6, 4), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    for e in range(2):
        assert torch.equal(mxfp4_dequantize(blocks[e], scales[e], torch.float32).t(), theirs[e])


def test_deepseek_fp8_blocks_as_released(tmp_path):
    src = _make("deepseek_v3", tmp_path / "src")
    state = write_fp8(src, tmp_path / "q", block=(16, 16))
    _check_parity(tmp_path / "q", write_dequantized(src, tmp_path / "deq", state))
    plan = offload.plan_checkpoint(tmp_path / "q")
    assert isinstance(plan.expert_format, Fp8BlockFormat) and plan.expert_format.block == (16, 16)
    # an FP8 expert: 1 byte per weight + a float32 scale per 16 x 16 block
    assert plan.expert_nbytes() == 3 * 16 * 32 + 3 * 4 * 2


def test_mla_caches_the_latent_and_decodes_as_a_full_forward(tiny_dir):
    model = offload.from_pretrained(tiny_dir("deepseek_v3"), device="cpu").model
    spec = model.spec
    kv = KVCache(spec, 1, 16, torch.float32, torch.device("cpu"), model.layer_stores)
    # per token: every layer's latent (kv_lora_rank) and shared rotary key (qk_rope_head_dim), nothing per head
    assert kv.bytes_per_token == spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * 4 == 3 * 12 * 4
    ids = torch.tensor([[5, 17, 33, 60, 8, 9, 10, 11]])
    full = model.forward(ids, torch.ones_like(ids), torch.arange(8)[None])
    model.forward(ids[:, :5], torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], kv)
    steps = [model.forward(ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), kv)
             for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "deepseek_v2", "glm4_moe"])
def test_pregate_ranks_by_each_routers_own_rule(tiny_dir, family):
    """Fed the hidden state the next layer will see, pre-gating names exactly the experts that layer picks."""
    model = offload.from_pretrained(tiny_dir(family), device="cpu", predictor="pregate")
    pre = model.model.prefetcher.predictor
    moe = model.model.moe_layers
    layer = model.model.layers[moe[1]]
    hidden = torch.randn(5, model.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    from offload.model.attention import rms_norm
    from predictors import RouteContext

    experts, _ = layer.router.select(rms_norm(hidden, layer.post_norm, model.spec.rms_norm_eps))
    ctx = RouteContext(0, np.zeros((5, 1, model.spec.top_k), dtype=np.int64),
                       np.full((5, len(moe), model.spec.top_k), -1), hidden)
    scores = pre.predict(ctx, 1)[0]  # [tokens, experts]
    picked = np.argsort(-scores, axis=1, kind="stable")[:, : model.spec.top_k]
    assert [sorted(p) for p in picked.tolist()] == [sorted(e) for e in experts.tolist()]
    model.cache.close()


# file: family, layers, MoE layers, experts, top-k, hidden, expert intermediate, shared intermediate, attention
RELEASED = {
    "gpt-oss-20b": ("gpt_oss", 24, 24, 32, 4, 2880, 2880, 0, "gqa"),
    "gpt-oss-120b": ("gpt_oss", 36, 36, 128, 4, 2880, 2880, 0, "gqa"),
    "deepseek-v3": ("deepseek_v3", 61, 58, 256, 8, 7168, 2048, 2048, "mla"),
    "deepseek-r1": ("deepseek_v3", 61, 58, 256, 8, 7168, 2048, 2048, "mla"),
    "kimi-k2-instruct": ("deepseek_v3", 61, 60, 384, 8, 7168, 2048, 2048, "mla"),
    "deepseek-v2-lite": ("deepseek_v2", 27, 26, 64, 6, 2048, 1408, 2816, "mla"),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_give_the_real_shapes(name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    family = family_for_config(cfg)
    spec = family.spec_from_config(cfg, torch.bfloat16)
    got = (spec.family, spec.num_layers, spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size,
           spec.expert_intermediate_size, spec.shared_expert_intermediate_size, family.attention)
    assert got == RELEASED[name]
    if family.attention == "mla":
        assert (spec.kv_lora_rank, spec.qk_rope_head_dim, spec.n_group) == (512, 64, cfg["n_group"])
        assert spec.rope.kind == "yarn" and spec.rope.interleave
    else:
        assert spec.sliding_windows[:2] == (128, None) and spec.attention_sinks and spec.rope.kind == "yarn"


# file: expert format as `offload info` names it, one expert's bytes as stored (from config.json alone)
FORMATS = {
    "gpt-oss-20b": ("mxfp4", 3 * 2880 * 2880 * 17 // 32 + 3 * 2880 * 2),          # 4.25 bits + bf16 biases
    "deepseek-v3": ("fp8 e4m3, 128x128 blocks", 3 * 7168 * 2048 + 3 * 56 * 16 * 4),  # 1 byte + fp32 block scales
    "kimi-k2.6": ("int4-g32-sym (compressed-tensors)", 3 * 7168 * 2048 // 2 + 3 * 7168 * 2048 // 32 * 2 + 3 * 16),
    "qwen3-30b-a3b-gptq-int4": ("int4-g128-sym (gptq)", None),
    "deepseek-v2-lite": ("bfloat16", 3 * 2048 * 1408 * 2),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_info_from_a_released_config_alone(tmp_path, name):
    from offload.checkpoint.plan import plan_config

    (tmp_path / "config.json").write_bytes((CONFIGS / f"{name}.json").read_bytes())
    plan = plan_config(tmp_path)
    fmt, nbytes = FORMATS[name]
    assert plan.expert_format.name == fmt
    if nbytes is not None:
        assert plan.expert_nbytes == nbytes
    else:  # GPTQ int4 g128: int32 words of 8 codes, fp16 scales, packed zeros and g_idx per projection
        assert 3 * 2048 * 768 // 2 < plan.expert_nbytes < 3 * 2048 * 768 // 2 * 1.1


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "glm4_moe"])
def test_run_and_info_from_the_cli(tiny_dir, tmp_path, family):
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from tests.tiny_models import add_char_tokenizer

    path = add_char_tokenizer(shutil.copytree(tiny_dir(family), tmp_path / family))
    runner = CliRunner()
    run = runner.invoke(app, ["run", str(path), "def f(x):", "--max-new-tokens", "6", "--expert-budget", "2",
                              "--device", "cpu"])
    assert run.exit_code == 0, run.output
    expected = offload.from_pretrained(path, device="cpu").generate_text("def f(x):", max_new_tokens=6)
    assert run.stdout == "def f(x):" + expected + "\n"
    info = runner.invoke(app, ["info", str(path)])
    assert info.exit_code == 0 and family in info.stdout


def test_multi_token_prediction_layers_are_skipped_with_one_line(tiny_dir, tmp_path, caplog):
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(tiny_dir("deepseek_v3"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)  # layer num_hidden_layers: the MTP module
    save_file(tensors, path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="offload.checkpoint.plan"):
        plan = offload.plan_checkpoint(path)
    assert plan.spec.num_layers == 3
    assert [r.getMessage() for r in caplog.records if "skipping layer" in r.getMessage()] == [
        f"{path}: skipping layer(s) 3 (multi-token prediction, not used for generation)"]
