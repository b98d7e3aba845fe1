"""The late-2026 families beyond the plain parity tests (test_forward.py runs those over every budget and policy):
the RAM tier; Qwen3.5 as the hub stores it (experts fused per layer, the text model under a multimodal wrapper);
FP8-block and int4 releases of Qwen3-Next and MiniMax-M2 computing what transformers computes on the dequantized
weights; the released config.json files at real scale, the linear-attention state counted once per sequence;
`offload run` / `info` from the CLI; pre-gating with each new router; hybrid execution and routing traces.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.checkpoint.families import family_for_config
from offload.checkpoint.plan import plan_config
from offload.hw.machine import Memory
from offload.memory.budget import Placement, memory_plan, sequence_nbytes
from offload.model.attention import rms_norm
from tests.offload.checkpoint.test_families_2026 import _check_parity
from tests.offload.model.test_forward import _min_gap, _prompts, _reference
from tests.paths import DATA
from tests.quant_checkpoints import (
    ATTENTION,
    DENSE_MLP,
    EXPERT,
    write_compressed_tensors,
    write_dequantized,
    write_fp8,
    write_gptq,
)

NEW = ["glm4_moe_lite", "qwen3_next", "qwen3_5_moe", "minimax_m2", "gemma4"]
NEW_TOKENS = 8
CONFIGS = DATA / "configs"


@pytest.mark.parametrize("family", NEW)
def test_ram_tier_matches_transformers(tiny_dir, family):
    """Float32 both sides, as test_forward.py (its tolerance and margin check): only summation orders differ."""
    path = tiny_dir(family)
    ids, mask = _prompts(3)
    tokens, scores, logits = _reference(path, 3, torch.float32)
    assert _min_gap(scores, tokens) > 1e-3
    model = offload.from_pretrained(path, device="cpu", expert_budget="25%", offload_to="ram", policy="lfu")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                      pad_token_id=0), tokens)
    torch.testing.assert_close(model(ids, attention_mask=mask)[mask.bool()], logits[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", NEW)
def test_the_other_policies_give_transformers_tokens(tiny_dir, family):
    """test_forward.py runs lru, lfu and fifo at every budget; here the other three (layer-aware and prediction-aware
    eviction) at one slot, where every step evicts, in both tiers, on a left-padded batch of 3."""
    path = tiny_dir(family)
    ids, mask = _prompts(3)
    tokens, scores, _ = _reference(path, 3, torch.float32)
    assert _min_gap(scores, tokens) > 1e-3
    for policy in ("layer-lru", "predictive", "layer-budget"):
        for tier in ("disk", "ram"):
            model = offload.from_pretrained(path, device="cpu", expert_budget=1, offload_to=tier, policy=policy)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=0)
            assert torch.equal(got, tokens), (policy, tier)


def _as_hub_qwen3_5(src: Path, out: Path) -> Path:
    """Qwen3.5 as released: Qwen3_5MoeForConditionalGeneration (text under text_config, a vision tower beside it,
    tensors under model.language_model.) with each layer's experts fused into gate_up_proj [E, 2I, H] (gate rows,
    then up rows) and down_proj [E, H, I]; transformers loads this layout natively."""
    out.mkdir()
    tensors, cfg = load_file(src / "model.safetensors"), json.loads((src / "config.json").read_text())
    fused, experts = {}, {}
    for name, w in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m:
            experts[(int(m[1]), int(m[2]), m[3])] = w
        else:
            fused[name.replace("model.", "model.language_model.", 1)] = w
    for layer in range(cfg["num_hidden_layers"]):
        e = range(cfg["num_experts"])
        p = f"model.language_model.layers.{layer}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack([torch.cat([experts[layer, i, "gate"], experts[layer, i, "up"]])
                                                 for i in e])
        fused[p + "down_proj"] = torch.stack([experts[layer, i, "down"] for i in e])
    fused["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 4)  # a vision tower offload never reads
    save_file(fused, out / "model.safetensors", metadata={"format": "pt"})
    wrapper = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
               "text_config": {**cfg, "architectures": None}, "tie_word_embeddings": False,
               "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                                 "out_hidden_size": cfg["hidden_size"]}}
    (out / "config.json").write_text(json.dumps(wrapper))
    return out


def test_qwen3_5_as_released_on_the_hub(tiny_dir, tmp_path):
    src = tiny_dir("qwen3_5_moe")
    hub = _as_hub_qwen3_5(src, tmp_path / "hub")
    ids, mask = _prompts(3)
    tokens, _, logits = _reference(src, 3, torch.float32)  # the same weights, as save_pretrained writes them
    for budget, tier in ((1, "disk"), ("100%", "ram")):
        model = offload.from_pretrained(hub, device="cpu", expert_budget=budget, offload_to=tier)
        assert model.plan.storage.name == "fused-gate-up"
        assert model.spec.architecture == "Qwen3_5MoeForConditionalGeneration"
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                          pad_token_id=0), tokens), (budget, tier)
        torch.testing.assert_close(model(ids, attention_mask=mask)[mask.bool()], logits[mask.bool()], atol=1e-4,
                                   rtol=0)
    # an expert slice is one contiguous read: gate and up halves are views of it, no copy per matrix
    assert offload.plan_checkpoint(hub).expert_nbytes() == 3 * 32 * 16 * 4
    with pytest.raises(offload.ConfigError, match="fuses each layer's experts"):
        from offload.experts.quant import parse_scheme
        from offload.tools.quantize import quantize_checkpoint

        quantize_checkpoint(hub, tmp_path / "q", parse_scheme("int8"))


# FP8 as DeepSeek / Qwen3-Next-FP8 / MiniMax-M2 release it: every linear projection, the linear-attention ones too
FP8_TARGETS = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|linear_attn\.(in_proj_\w+|out_proj)"
                         r"|(mlp|block_sparse_moe)\.(experts\.\d+\.|shared_expert\.)?(gate_proj|up_proj|down_proj|w1"
                         r"|w2|w3))\.weight")
LINEAR_ATTN = re.compile(r"model\.layers\.\d+\.linear_attn\.(in_proj_\w+|out_proj)\.weight")


@pytest.mark.parametrize("family, fmt", [("qwen3_next", "e4m3"), ("minimax_m2", "float8_e4m3fn")])
def test_fp8_blocks_as_released(tiny_dir, tmp_path, family, fmt):
    src = tiny_dir(family)
    state = write_fp8(src, tmp_path / "q", block=(16, 16), targets=FP8_TARGETS.fullmatch, fmt=fmt)
    _check_parity(tmp_path / "q", write_dequantized(src, tmp_path / "deq", state))
    plan = offload.plan_checkpoint(tmp_path / "q")
    assert plan.expert_format.block == (16, 16)
    quantized = [n for n, t in plan.dense.items() if hasattr(t, "fmt")]
    assert any("linear_attn" in n for n in quantized) == (family == "qwen3_next")  # dequantized once, at load


@pytest.mark.parametrize("family, writer", [("qwen3_next", write_gptq), ("minimax_m2", write_compressed_tensors)])
def test_int4_releases(tiny_dir, tmp_path, family, writer):
    """GPTQ int4 (experts, attention, shared expert and linear-attention projections) and compressed-tensors int4
    (experts): computed on their portable path in float32 (quant_activations), so as test_quantized.py, within
    1e-4 of transformers on the dequantized weights."""
    src = tiny_dir(family)
    targets = (lambda n: any(p.fullmatch(n) for p in (EXPERT, ATTENTION, DENSE_MLP, LINEAR_ATTN))) \
        if writer is write_gptq else EXPERT.fullmatch
    state = writer(src, tmp_path / "q", bits=4, group_size=8, sym=True, targets=targets)
    deq = write_dequantized(src, tmp_path / "deq", state)
    ids, mask = _prompts(3)
    tokens, scores, logits = _reference(deq, 3, torch.float32)
    assert _min_gap(scores, tokens) > 1e-3
    for budget, tier in ((1, "disk"), ("100%", "ram")):
        model = offload.from_pretrained(tmp_path / "q", device="cpu", expert_budget=budget, offload_to=tier,
                                        quant_activations="float32")
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                          pad_token_id=0), tokens), (budget, tier)
        torch.testing.assert_close(model(ids, attention_mask=mask)[mask.bool()], logits[mask.bool()], atol=1e-4,
                                   rtol=0)


# file: family, layers, MoE layers, experts, top-k, hidden, expert width, shared width, attention pieces,
#       bytes per token of context and fixed bytes per sequence in bf16, one bf16 expert's bytes
RELEASED = {
    # 10 full layers x 2 kv heads x 256 x (k, v) x 2 bytes; 30 DeltaNet layers x (conv: (2 x 16 + 32) x 128 channels
    # x 3 inputs x 2 bytes + recurrent: 32 heads x 128 x 128 x 4 bytes)
    "qwen3.5-35b-a3b": ("qwen3_5_moe", 40, 40, 256, 8, 2048, 512, 512, {"gated-deltanet": 30, "gated-full": 10},
                        10 * 2 * 256 * 2 * 2, 30 * (8192 * 3 * 2 + 32 * 128 * 128 * 4), 3 * 2048 * 512 * 2),
    "qwen3-next-80b-a3b": ("qwen3_next", 48, 48, 512, 10, 2048, 512, 512,
                           {"gated-deltanet-grouped": 36, "gated-full": 12}, 12 * 2 * 256 * 2 * 2,
                           36 * (8192 * 3 * 2 + 32 * 128 * 128 * 4), 3 * 2048 * 512 * 2),
    # MLA: the latent (512) and the shared rotary key (64) per layer
    "glm-4.7-flash": ("glm4_moe_lite", 47, 46, 64, 4, 2048, 1536, 1536, {"mla": 47}, 47 * (512 + 64) * 2, 0,
                      3 * 2048 * 1536 * 2),
    "minimax-m2": ("minimax_m2", 62, 62, 256, 8, 3072, 1536, 0, {"gqa": 62}, 62 * 8 * 128 * 2 * 2, 0,
                   3 * 3072 * 1536 * 2),
    # 25 sliding layers of 8 kv heads x 256, 5 full layers of 2 kv heads x 512 (keys and their normed copies as values)
    "gemma-4-26b-a4b": ("gemma4", 30, 30, 128, 8, 2816, 704, 0, {"gemma-sliding": 25, "gemma-global": 5},
                        (25 * 8 * 256 + 5 * 2 * 512) * 2 * 2, 0, 3 * 2816 * 704 * 2),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_give_the_real_shapes(tmp_path, name):
    (tmp_path / "config.json").write_bytes((CONFIGS / f"{name}.json").read_bytes())
    plan = plan_config(tmp_path)
    spec, family = plan.spec, plan.family
    *shape, pieces, per_token, fixed, expert = RELEASED[name]
    assert [spec.family, spec.num_layers, spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size,
            spec.expert_intermediate_size, spec.shared_expert_intermediate_size] == shape
    assert Counter(family.layer_pieces(spec)) == pieces
    assert sequence_nbytes(spec, torch.bfloat16, family.layer_pieces(spec)) == (per_token, fixed)
    assert plan.expert_nbytes == expert


def test_released_config_quirks():
    spec = lambda name: family_for_config(cfg := _text(name)).spec_from_config(cfg, torch.bfloat16)  # noqa: E731
    qwen = spec("qwen3.5-35b-a3b")
    assert qwen.rope.dim == 64 and qwen.linear_conv_kernel == 4 and qwen.layer_types[:4] == (
        "linear_attention",) * 3 + ("full_attention",)
    assert spec("glm-4.7-flash").rope.interleave and spec("glm-4.7-flash").routed_scaling_factor == 1.8
    gemma = spec("gemma-4-26b-a4b")
    assert (gemma.global_head_dim, gemma.global_num_kv_heads, gemma.attention_k_eq_v) == (512, 2, True)
    assert gemma.final_logit_softcapping == 30.0 and gemma.embed_scale == pytest.approx(2816**0.5)
    assert gemma.global_rope.kind == "proportional" and gemma.global_rope.proportion == 0.25
    assert gemma.sliding_windows[:6] == (1024,) * 5 + (None,)
    # Qwen3-Next's released config.json lists no layer_types, only the interval (transformers derives them)
    cfg = {k: v for k, v in _text("qwen3-next-80b-a3b").items() if k != "layer_types"}
    assert family_for_config(cfg).spec_from_config({**cfg, "full_attention_interval": 4},
                                                   torch.bfloat16).layer_types == spec("qwen3-next-80b-a3b").layer_types


def _text(name: str) -> dict:
    from offload.checkpoint.locate import language_config

    return language_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def test_auto_budget_counts_the_linear_state_once_per_sequence(tmp_path):
    (tmp_path / "config.json").write_bytes((CONFIGS / "qwen3.5-35b-a3b.json").read_bytes())
    plan = plan_config(tmp_path)
    per_token, fixed = RELEASED["qwen3.5-35b-a3b"][-3:-1]
    ram = Memory("RAM", 64 * 2**30, 32 * 2**30)
    for context in (1024, 4096):
        mp = memory_plan(plan, Placement(torch.device("cpu"), torch.bfloat16, context=context, sequences=16), ram)
        assert mp.kv == (per_token * context + fixed) * 16  # the state does not grow with the context


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_info_on_the_released_configs(tmp_path, name):
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "config.json").write_bytes((CONFIGS / f"{name}.json").read_bytes())
    out = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert out.exit_code == 0, out.output
    text = " ".join(out.stdout.split())
    *shape, pieces, per_token, fixed, _ = RELEASED[name]
    assert f"{shape[1]} ({shape[2]} MoE)" in text and f"{shape[3]} per MoE layer, top-{shape[4]}" in text
    assert all(f"{n} x {piece}" in text for piece, n in pieces.items())
    assert f"{per_token / 2**10:.1f} KiB of keys and values per token of context" in text
    assert (f"{fixed / 2**20:.1f} MiB of linear-attention state (constant in the context)" in text) == (fixed > 0)


@pytest.mark.parametrize("family", NEW)
def test_run_and_info_from_the_cli(tiny_dir, tmp_path, family):
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


@pytest.mark.parametrize("family", ["minimax_m2", "gemma4", "qwen3_next"])
def test_pregate_ranks_by_each_routers_own_rule(tiny_dir, family):
    """Fed the hidden state the next layer will see, pre-gating names exactly the experts that layer picks (MiniMax:
    sigmoid scores with the bias held by its MoE block; Gemma-4: a router that normalises the residual itself)."""
    from predictors import RouteContext

    model = offload.from_pretrained(tiny_dir(family), device="cpu", predictor="pregate")
    pre, moe = model.model.prefetcher.predictor, model.model.moe_layers
    layer = model.model.layers[moe[1]]
    hidden = torch.randn(5, model.spec.hidden_size, generator=torch.Generator().manual_seed(1))
    normed = rms_norm(hidden, layer.post_norm, model.spec.rms_norm_eps)
    experts, _ = layer.router.select(layer.router_input(normed, hidden))
    ctx = RouteContext(0, np.zeros((5, 1, model.spec.top_k), dtype=np.int64),
                       np.full((5, len(moe), model.spec.top_k), -1), hidden)
    picked = np.argsort(-pre.predict(ctx, 1)[0], axis=1, kind="stable")[:, : model.spec.top_k]
    assert [sorted(p) for p in picked.tolist()] == [sorted(e) for e in experts.tolist()]
    model.cache.close()


def test_hybrid_execution_and_traces_on_a_linear_attention_model(tiny_dir, tmp_path):
    from offload.traces.format import read_trace
    from offload.traces.recorder import record_trace

    path, prompt = tiny_dir("qwen3_5_moe"), torch.tensor([[5, 17, 33, 60, 8]])
    plain = offload.from_pretrained(path, device="cpu", expert_budget=2, offload_to="ram")
    hybrid = offload.from_pretrained(path, device="cpu", expert_budget=2, offload_to="ram", hybrid="always")
    assert torch.equal(hybrid.generate(prompt, max_new_tokens=6), plain.generate(prompt, max_new_tokens=6))
    assert hybrid.stats.hybrid.cpu_experts > 0
    tokens = record_trace(plain, [prompt], tmp_path / "t.jsonl.gz", max_new_tokens=4)
    trace = read_trace(tmp_path / "t.jsonl.gz")
    assert len(trace) == tokens == 5 + 3 and trace.header.num_layers == plain.spec.num_moe_layers


def test_multi_token_prediction_weights_are_left_alone(tiny_dir, tmp_path):
    """Qwen3-Next / Qwen3.5 releases carry an MTP head under mtp.*: never read, never in the way."""
    path = shutil.copytree(tiny_dir("qwen3_next"), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(32, 64)
    save_file(tensors, path / "model.safetensors")
    ids = torch.tensor([[5, 17, 33, 60, 8]])
    assert torch.equal(offload.from_pretrained(path, device="cpu").generate(ids, max_new_tokens=4),
                       offload.from_pretrained(tiny_dir("qwen3_next"), device="cpu").generate(ids, max_new_tokens=4))


def test_serve_engine_and_chat_on_a_linear_attention_model(tiny_dir, tmp_path):
    """`offload serve`'s engine (continuous batching, a cancelled request's state row given to the next) and
    `offload chat` on Qwen3.5: each request's text is what generate() gives it alone."""
    from typer.testing import CliRunner

    from cli.main import app
    from offload.serve.engine import Engine, GenerationRequest
    from tests.offload.serve.test_engine import WAIT_S, Collector
    from tests.tiny_models import add_char_tokenizer

    path = add_char_tokenizer(shutil.copytree(tiny_dir("qwen3_5_moe"), tmp_path / "m"))
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>")
    model = offload.from_pretrained(path, device="cpu", expert_budget=6, batch_size=2, context=64)
    prompts = ["def f(x):", "class A:", "import os", "x = [1, 2"]
    alone = {p: model.generate_text(p, max_new_tokens=8) for p in prompts}
    engine = Engine(lambda: model).start()
    try:
        assert engine.wait_ready(WAIT_S)
        sampling = model.sampling_config(max_new_tokens=8, do_sample=False)
        cancelled = Collector()
        ticket = engine.submit(GenerationRequest(tuple(model.encode("while True:")[0].tolist()), sampling), cancelled)
        cancelled.seen.append(cancelled.events.get(timeout=WAIT_S))
        ticket.cancel()
        outs = {p: Collector() for p in prompts}
        for p, out in outs.items():
            engine.submit(GenerationRequest(tuple(model.encode(p)[0].tolist()), sampling), out)
        assert {p: out.result()[0] for p, out in outs.items()} == alone
    finally:
        engine.stop()
    result = CliRunner().invoke(app, ["chat", str(path), "--device", "cpu", "--max-new-tokens", "8"], input="hello\n")
    assert result.exit_code == 0, result.output
    ids = model.encode("[user] hello\n>")
    assert model.tokenizer.decode(model.generate(ids, max_new_tokens=8)[0, ids.shape[1]:].tolist()) in result.stdout


def test_the_quantize_tool_on_a_hybrid(tiny_dir, tmp_path):
    """`offload quantize` (int8 per channel) on Qwen3-Next: the experts quantized, the linear-attention layers left
    as they were, and the result computes what transformers computes on the weights an independent unpacker reads."""
    from offload.experts.quant import parse_scheme
    from offload.tools.quantize import quantize_checkpoint
    from tests.offload.tools.test_quantize import _dequantized_reference

    src = tiny_dir("qwen3_next")
    report = quantize_checkpoint(src, tmp_path / "q", parse_scheme("int8"))
    assert report.experts == 4 * 8
    deq = write_dequantized(src, tmp_path / "deq", _dequantized_reference(tmp_path / "q", 8, None))
    ids, mask = _prompts(3)
    tokens, scores, _ = _reference(deq, 3, torch.float32)
    assert _min_gap(scores, tokens) > 1e-3
    model = offload.from_pretrained(tmp_path / "q", device="cpu", expert_budget=3, quant_activations="float32")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                      pad_token_id=0), tokens)
