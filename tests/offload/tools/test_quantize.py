"""offload/tools/quantize.py and `offload quantize`: the output is a compressed-tensors checkpoint that offload,
transformers and an independent unpacker read alike; the source is never touched; nothing half-written
is ever left under the output's name."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import offload
from cli.main import app
from offload.errors import ConfigError
from offload.experts.quant import parse_scheme
from offload.tools.quantize import quantize_checkpoint
from tests.offload.model.test_forward import _min_gap, _prompts
from tests.quant_checkpoints import write_dequantized
from tests.reference import ref_compressed_tensors_dequantize

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny float Qwen3-MoE whose expert matrices take int4 groups of 32 (64 x 64)."""
    import transformers

    out = tmp_path_factory.mktemp("src") / "model"
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=64,
                                         num_experts=4, num_experts_per_tok=2, initializer_range=0.2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0, norm_topk_prob=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(out)
    (out / "notes.txt").write_text("copied as is")
    return out


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _dequantized_reference(qdir, bits, group):
    """Float weights from the written tensors by tests/reference.py's unpacker (not offload's)."""
    tensors, state = load_file(qdir / "model.safetensors"), {}
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            p = name.removesuffix(".weight_packed")
            state[f"{p}.weight"] = ref_compressed_tensors_dequantize(
                t, tensors[f"{p}.weight_scale"], tensors[f"{p}.weight_shape"], tensors.get(f"{p}.weight_zero_point"),
                bits, group)
        elif not name.split(".")[-1].startswith("weight_"):
            state[name] = t
    return state


@pytest.mark.parametrize("spec, bits, group", [("int4-g32-asym", 4, 32), ("int4-g32-sym", 4, 32), ("int8", 8, None)])
def test_round_trip_equals_the_dequantized_reference(source, tmp_path, spec, bits, group):
    before = digest(source)
    report = quantize_checkpoint(source, tmp_path / "q", parse_scheme(spec))
    assert digest(source) == before  # the source is only read
    assert report.experts == 8 and report.bytes_after < report.bytes_before / (3.5 if bits == 8 else 6)
    qdir = tmp_path / "q"
    assert (qdir / "notes.txt").read_text() == "copied as is" and not (tmp_path / "q.partial").exists()
    deq = write_dequantized(source, tmp_path / "deq", _dequantized_reference(qdir, bits, group))
    import transformers

    ids, mask = _prompts(3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
    assert _min_gap(torch.stack(out.scores, 1), out.sequences) > 1e-3
    model = offload.from_pretrained(qdir, device="cpu", expert_budget=3, quant_activations="float32")
    assert model.plan.expert_format.name == f"{parse_scheme(spec)} (compressed-tensors)"
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                      pad_token_id=0), out.sequences)


def test_transformers_with_compressed_tensors_loads_the_output(source, tmp_path):
    pytest.importorskip("compressed_tensors")
    import transformers

    quantize_checkpoint(source, tmp_path / "q", parse_scheme("int4-g32-sym"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    ours = offload.from_pretrained(tmp_path / "q", device="cpu", quant_activations="float32")
    ids = torch.tensor([[5, 17, 33, 60, 8, 9]])
    with torch.no_grad():
        # transformers dequantizes experts into the scales' dtype (bf16 here) before its matmuls: bf16 weights
        torch.testing.assert_close(ours(ids), theirs(ids).logits.float(), atol=5e-2, rtol=0)


def test_an_interrupted_quantize_leaves_no_output(source, tmp_path, monkeypatch):
    import offload.experts.quant as quant

    real, calls = quant.quantize, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, tmp_path / "q", parse_scheme("int8"))
    assert list(tmp_path.iterdir()) == []


def test_refuses_the_source_a_non_empty_output_and_bad_schemes(source, tmp_path):
    with pytest.raises(ConfigError, match="inside the source checkpoint"):
        quantize_checkpoint(source, source / "q", parse_scheme("int8"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        quantize_checkpoint(source, tmp_path / "full", parse_scheme("int8"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="group_size 256 does not divide"):
        quantize_checkpoint(source, tmp_path / "x", parse_scheme("int4-g256-sym"))
    quantize_checkpoint(source, tmp_path / "q8", parse_scheme("int8"))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "again", parse_scheme("int8"))


def test_cli(source, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size",
                                 "32", "--sym", "--search"])
    assert result.exit_code == 0, result.output
    assert "8 experts as int4-g32-sym" in result.stderr
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 32
    info = runner.invoke(app, ["info", str(tmp_path / "q")])
    assert "int4-g32-sym (compressed-tensors)" in info.stdout
    bad = runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "b"), "--bits", "3"])
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: --bits 3")
