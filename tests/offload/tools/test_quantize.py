"""offload/tools/quantize.py and `offload quantize`: the output is a compressed-tensors checkpoint that offload,
transformers and an independent unpacker read alike; the source is never touched; nothing half-written
is ever left under the output's name."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import offload
from cli.main import app
from offload.errors import ConfigError
from offload.experts.quant import parse_scheme
from offload.tools.quantize import quantize_checkpoint
from tests.offload.model.test_forward import _min_gap, _prompts
from tests.quant_checkpoints import tiny_qwen3_moe, write_dequantized
from tests.reference import ref_compressed_tensors_dequantize

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny float Qwen3-MoE whose expert matrices take int4 groups of 32 (64 x 64)."""
    out = tiny_qwen3_moe(tmp_path_factory.mktemp("src") / "model")
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


def test_paths_named_like_its_temporary_are_never_touched(source, tmp_path):
    # a folder of the user's named OUT.partial, and a source model itself named OUT.partial: the temporary is
    # OUT.partial-<pid>-<random>, created exclusively, so neither is ever removed or written
    theirs = tmp_path / "q.partial"
    theirs.mkdir()
    (theirs / "mine.txt").write_text("keep")
    quantize_checkpoint(source, tmp_path / "q", parse_scheme("int8"))
    assert (theirs / "mine.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == [
        "q", "q.partial"]
    model_partial = tmp_path / "m.partial"
    shutil.copytree(source, model_partial)
    before = digest(model_partial)
    result = CliRunner().invoke(app, ["quantize", str(model_partial), "--out", str(tmp_path / "m"), "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert digest(model_partial) == before and (tmp_path / "m" / "config.json").is_file()


def test_every_file_and_its_mode_are_kept(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    save_file({"w": torch.ones(2, 2)}, str(src / "predictor.safetensors"))   # as tiny-moe ships one
    modes = {"model.safetensors": 0o640, "config.json": 0o644, "predictor.safetensors": 0o600, "notes.txt": 0o604}
    for name, mode in modes.items():
        (src / name).chmod(mode)
    quantize_checkpoint(src, tmp_path / "q", parse_scheme("int8"))
    out = tmp_path / "q"
    assert {p.name for p in src.iterdir()} == {p.name for p in out.iterdir()}
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in modes} == modes
    assert (out / "predictor.safetensors").read_bytes() == (src / "predictor.safetensors").read_bytes()


def test_a_full_disk_is_one_line_and_leaves_nothing(source, tmp_path):
    # a real failed write: a file size limit (RLIMIT_FSIZE) makes write() fail with EFBIG, as a full disk fails it
    # with ENOSPC; safetensors raises its own error type for either
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    before = digest(source)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        result = CliRunner().invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--bits", "8"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("Error: cannot write model.safetensors of the quantized checkpoint")
    assert list(tmp_path.iterdir()) == [] and digest(source) == before


def test_ctrl_c_exits_130_and_leaves_nothing(source, tmp_path, monkeypatch):
    import offload.experts.quant as quant

    monkeypatch.setattr(quant, "quantize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    result = CliRunner().invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--bits", "8"])
    assert (result.exit_code, result.stderr) == (130, "Error: interrupted\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["int4-g32-asym", "int8"])
def test_each_expert_is_one_byte_range_and_a_disk_miss_one_read(source, tmp_path, spec):
    from offload.checkpoint.plan import plan_checkpoint

    quantize_checkpoint(source, tmp_path / "q", parse_scheme(spec))
    plan = plan_checkpoint(tmp_path / "q")
    for key, tensors in plan.experts.items():  # gate, up and down with their scales (and zero points), no gaps
        spans = sorted((t.start, t.end) for t in tensors)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), key
        assert len({t.path for t in tensors}) == 1
    assert plan.reads_per_expert() == 1  # what the performance model charges a disk miss
    model = offload.from_pretrained(tmp_path / "q", device="cpu", expert_budget=1, offload_to="disk")
    model.generate(torch.tensor([[5, 17, 33, 60, 8]]), max_new_tokens=4)
    misses = model.stats.total.misses
    assert misses > 4 and model.cache.store.reader.requests == misses  # one read request (preadv) per miss


def test_an_int4_disk_miss_is_read_into_its_slot_and_only_the_scales_are_derived(tmp_path):
    """Experts large enough that the read's own scales and 4 KiB alignment cost under OVER_SLACK: the slot computes
    from the codes where the read put them (no staging buffer, no code copied), and every budget and tier gives the
    tokens of the RAM tier, whose slots hold converted copies."""
    from offload.memory.transfer import OVER_SLACK

    src = tiny_qwen3_moe(tmp_path / "src", hidden=256, intermediate=512)
    quantize_checkpoint(src, tmp_path / "q", parse_scheme("int4-g128-asym"))
    ids = torch.tensor([[5, 17, 33, 60, 8, 41]])
    ram = offload.from_pretrained(tmp_path / "q", device="cpu", expert_budget="100%", offload_to="ram")
    assert not ram.cache.mover.over  # the RAM tier holds converted experts: a miss is one copy
    reference = ram.generate(ids, max_new_tokens=NEW_TOKENS)
    converted = ram.cache.mover.slot_layout.nbytes
    for budget in ("100%", 2):
        disk = offload.from_pretrained(tmp_path / "q", device="cpu", expert_budget=budget, offload_to="disk")
        mover = disk.cache.mover
        assert mover.over and not mover.direct and mover._staging is None
        assert converted < disk.cache.slot_nbytes <= (1 + OVER_SLACK) * converted
        assert torch.equal(disk.generate(ids, max_new_tokens=NEW_TOKENS), reference)
        assert disk.stats.total.misses > 0 and mover.store.reader.requests == disk.stats.total.misses
