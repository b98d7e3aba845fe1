"""`offload quantize` from a GGUF file: the output is the Hugging Face checkpoint the file was converted from, with its
experts quantized. Oracle: the same scheme applied to the original safetensors checkpoint, tensor for tensor (a float32
GGUF holds exactly the original values, so every quantized code, scale and resident weight must be equal), and the
tokenizer and chat template the file embeds, id for id."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import offload
from cli.main import app
from offload.checkpoint.plan import plan_checkpoint
from offload.errors import UnsupportedModelError
from offload.experts.quant import parse_scheme
from offload.serve.chat import resolve_chat_template
from offload.tools.quantize import quantize_checkpoint
from tests.gguf_checkpoints import write_gguf
from tests.offload.checkpoint.test_families_2026 import _make
from tests.offload.checkpoint.test_gguf import CHANGES, FAMILIES
from tests.offload.model.test_forward import _prompts
from tests.offload.runtime.test_gguf_runtime import PROMPTS, write_tiny_gguf

SCHEME = parse_scheme("int8")  # per output channel: any tiny width


# Mixtral's q/k rows are permuted in llama-arch files; DeepSeek's kv_b is split into k_b / v_b; Qwen2-MoE's shared
# expert and its gate, GLM's and DeepSeek's shared experts and leading dense layers, OLMoE's full-width q/k norms
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_a_float_gguf_quantizes_to_what_its_source_checkpoint_does(family, tmp_path):
    src = _make(family, tmp_path / "src", **CHANGES.get(family, {}))
    path = tmp_path / f"{family}.gguf"
    write_gguf(src, path, family)  # F32 throughout: the original values
    from_hf = quantize_checkpoint(src, tmp_path / "q-hf", SCHEME)
    from_gguf = quantize_checkpoint(path, tmp_path / "q-gguf", SCHEME)
    assert (from_gguf.experts, from_gguf.bytes_after) == (from_hf.experts, from_hf.bytes_after)
    theirs, ours = (load_file(tmp_path / d / "model.safetensors") for d in ("q-hf", "q-gguf"))
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    assert plan_checkpoint(tmp_path / "q-gguf").spec == plan_checkpoint(tmp_path / "q-hf").spec
    ids, mask = _prompts(3)
    tokens = [offload.from_pretrained(d, device="cpu").generate(ids, attention_mask=mask, max_new_tokens=6,
                                                                 eos_token_id=2, pad_token_id=0)
              for d in (tmp_path / "q-hf", tmp_path / "q-gguf")]
    assert torch.equal(*tokens)


def test_the_files_tokenizer_and_chat_template_come_along(tmp_path):
    path = write_tiny_gguf(tmp_path / "src")
    result = CliRunner().invoke(app, ["quantize", str(path), "--out", str(tmp_path / "q"), "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert "experts as int4-g32-asym" in result.stderr
    ours, theirs = offload.from_pretrained(tmp_path / "q", device="cpu"), offload.from_pretrained(path, device="cpu")
    for text in PROMPTS:
        assert ours.tokenizer.encode(text).ids == theirs.tokenizer.encode(text).ids, text
    template = resolve_chat_template(tmp_path / "q")
    assert not template.is_fallback
    assert template.source == str(theirs.plan.metadata["tokenizer.chat_template"])
    assert ours.plan.spec.eos_token_ids == theirs.plan.spec.eos_token_ids
    assert len(ours.generate_text(PROMPTS[0], max_new_tokens=4)) > 0


def test_a_family_whose_checkpoints_fuse_experts_is_refused_in_one_line(tmp_path):
    src = _make("gpt_oss", tmp_path / "src", intermediate_size=32,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    path = tmp_path / "gpt-oss.gguf"
    write_gguf(src, path, "gpt_oss")
    with pytest.raises(UnsupportedModelError, match="fuse each layer's experts"):
        quantize_checkpoint(path, tmp_path / "q", SCHEME)
    result = CliRunner().invoke(app, ["quantize", str(path), "--out", str(tmp_path / "q")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()
