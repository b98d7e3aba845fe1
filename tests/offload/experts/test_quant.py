"""offload/experts/quant.py against tests/reference.py's loops, the compressed-tensors library and transformers.

Tolerances. Format readers and the quantizer are exact: they compute the same float32 products as the
oracles, so they are compared with torch.equal. The CPU kernels are tested in tests/offload/experts/kernels.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from offload.errors import CheckpointError, ConfigError, UnsupportedModelError
from offload.experts import quant as Q
from offload.experts.formats import compressed_tensors as CT
from offload.experts.formats import gptq as G
from offload.experts.formats.registry import format_from_config
from tests import reference as R
from tests.paths import DATA
from tests.quant_checkpoints import (
    autogptq_pack,
    ct_pack,
    load_state_dict,
    write_compressed_tensors,
    write_dequantized,
    write_gptq,
)

REAL_CONFIGS = json.loads((DATA / "quantization_configs.json").read_text())
SCHEMES = [(8, None, True), (8, 8, False), (4, 8, True), (4, 8, False), (4, 32, True), (4, None, False)]


def _w(out: int, in_: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, in_, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------------ scheme


def test_parse_scheme_spellings():
    assert Q.parse_scheme("int8") == Q.QuantScheme(8, None, True)
    assert Q.parse_scheme("int4") == Q.QuantScheme(4, 128, True)
    assert Q.parse_scheme("INT4-g32-asym") == Q.QuantScheme(4, 32, False)
    assert str(Q.parse_scheme("int4-g64-sym")) == "int4-g64-sym"


@pytest.mark.parametrize("text, option", [("int3", "bits"), ("int4-g48", "group"), ("int8-g128", "per-channel"),
                                          ("fp4", "unknown"), ("int8-asym", "per-channel")])
def test_parse_scheme_rejects(text, option):
    with pytest.raises(ConfigError) as e:
        Q.parse_scheme(text)
    assert option in _one_line(e) and text in str(e.value)


@pytest.mark.parametrize("kwargs, option", [({"bits": 3}, "bits"), ({"group_size": 0}, "group_size"),
                                            ({"group_size": -1}, "group_size")])
def test_scheme_validation(kwargs, option):
    with pytest.raises(ConfigError) as e:
        Q.QuantScheme(**kwargs)
    assert option in _one_line(e)


def test_group_must_divide_inputs():
    with pytest.raises(ConfigError) as e:
        Q.quantize(_w(4, 24), Q.QuantScheme(4, 16, True))
    assert "16" in _one_line(e) and "24" in str(e.value)


# ------------------------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("bits, group, sym", SCHEMES)
def test_quantize_matches_reference_rtn(bits, group, sym):
    w = _w(24, 64)
    q = Q.quantize(w, Q.QuantScheme(bits, group, sym))
    codes, scales, zeros = R.ref_rtn(w, bits, group, sym)
    assert torch.equal(q.codes, codes) and torch.equal(q.scales, scales) and torch.equal(q.zeros, zeros)
    assert torch.equal(Q.dequantize(q), R.ref_dequantize(codes, scales, zeros, group))


def test_quantize_zero_group_and_bf16_input():
    w = _w(8, 32).bfloat16()
    w[:, :8] = 0
    q = Q.quantize(w, Q.QuantScheme(4, 8, False), scale_dtype=torch.float16)
    assert torch.equal(Q.dequantize(q)[:, :8], torch.zeros(8, 8))
    assert torch.equal(q.scales, q.scales.half().float())  # representable in the format's dtype


@pytest.mark.parametrize("bits, group, sym", [(8, None, True), (4, 32, True), (4, 128, False)])
def test_clip_search_never_worse_and_helps_int4(bits, group, sym):
    w = _w(64, 256)
    scheme = Q.QuantScheme(bits, group, sym)
    rtn, searched = Q.quantize(w, scheme), Q.quantize(w, scheme, clip_search=True)
    g = group or 256
    rtn_err, searched_err = ((Q.dequantize(q) - w).view(64, -1, g).square().sum(-1) for q in (rtn, searched))
    assert (searched_err <= rtn_err).all()  # per group: ratio 1.0 is among the candidates
    if bits == 4:  # measured 3-9% lower relative error on gaussian weights
        assert Q.reconstruction_error(w, searched) < 0.98 * Q.reconstruction_error(w, rtn)


# ------------------------------------------------------------------------------------------------ GPTQ


def _method_and_scheme(quantization_config: dict):
    fmt = format_from_config(quantization_config)
    return fmt.quant_method, fmt.scheme


def _random_gptq(out: int, in_: int, bits: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per = 32 // bits
    qweight = torch.randint(-2**31, 2**31, (in_ // per, out), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2**31, 2**31, (in_ // group, out // per), generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(in_ // group, out, generator=g) * 0.1).half()
    return qweight, qzeros, scales, (torch.arange(in_) // group).to(torch.int32)


@pytest.mark.parametrize("bits, group", [(4, 8), (4, 32), (4, 64), (8, 16), (8, 64)])
def test_gptq_unpack_matches_reference(bits, group):
    tensors = _random_gptq(32, 64, bits, group, seed=bits + group)
    q = G.gptq_unpack(*tensors, bits, group)
    assert q.shape == (32, 64) and q.group_size == group
    assert torch.equal(Q.dequantize(q), R.ref_gptq_dequantize(*tensors, bits))


@pytest.mark.parametrize("bits, group, sym", SCHEMES)
def test_gptq_round_trip_and_autogptq_packing(bits, group, sym):
    q = Q.quantize(_w(32, 64), Q.QuantScheme(bits, group, sym), scale_dtype=torch.float16)
    t = G.gptq_pack(q)
    back = G.gptq_unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, group or -1)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert torch.equal(back.zeros, q.zeros) and back.scheme == q.scheme
    qweight, qzeros = autogptq_pack(q.codes, q.zeros, bits)  # the fixture's independent AutoGPTQ loops
    assert torch.equal(t["qweight"], qweight) and torch.equal(t["qzeros"], qzeros)
    assert torch.equal(Q.dequantize(q), R.ref_gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits))


def test_gptq_zero_point_zero_survives():
    q = Q.quantize(torch.rand(16, 32) + 0.1, Q.QuantScheme(4, 8, False))  # all-positive groups: zero 0
    assert (q.zeros == 0).all()
    t = G.gptq_pack(q)
    assert torch.equal(G.gptq_unpack(t["qweight"], t["qzeros"], t["scales"], None, 4, 8).zeros, q.zeros)


def test_gptq_plain_is_the_nibble_packing():
    q = Q.quantize(_w(32, 64), Q.QuantScheme(4, 32, True))
    assert torch.equal(G.gptq_plain(G.gptq_pack(q)["qweight"], 4), Q.pack_nibbles(q.codes))
    q8 = Q.quantize(_w(32, 64), Q.QuantScheme(8, None, True))
    assert torch.equal(G.gptq_plain(G.gptq_pack(q8)["qweight"], 8), q8.codes)


@pytest.mark.parametrize("which, shape", [("qweight", (8, 31)), ("qzeros", (2, 3)), ("scales", (2, 31)),
                                          ("g_idx", (63,))])
def test_gptq_bad_shapes_name_the_tensor(which, shape):
    tensors = dict(zip(("qweight", "qzeros", "scales", "g_idx"), _random_gptq(32, 64, 4, 32)))
    tensors[which] = torch.zeros(shape, dtype=tensors[which].dtype)
    with pytest.raises(CheckpointError) as e:
        G.gptq_unpack(*tensors.values(), 4, 32, name="model.layers.0.mlp.experts.3.up_proj", shape=(32, 64))
    assert f"model.layers.0.mlp.experts.3.up_proj.{which}" in _one_line(e) and str(list(shape)) in str(e.value)


def test_gptq_rejects_act_order_and_odd_bits():
    qweight, qzeros, scales, g_idx = _random_gptq(32, 64, 4, 32)
    with pytest.raises(UnsupportedModelError) as e:
        G.gptq_unpack(qweight, qzeros, scales, g_idx.flip(0), 4, 32, name="layer")
    assert "layer.g_idx" in _one_line(e)
    with pytest.raises(UnsupportedModelError):
        G.gptq_unpack(qweight, qzeros, scales, g_idx, 3, 32)
    with pytest.raises(CheckpointError):
        G.gptq_unpack(qweight, qzeros, scales, g_idx, 4, 48)  # does not divide 64


def test_gptq_config_parsing():
    real = REAL_CONFIGS["qwen3-30b-a3b-gptq-int4"]
    assert _method_and_scheme(real) == ("gptq", Q.QuantScheme(4, 128, True))
    with pytest.raises(UnsupportedModelError):
        G.gptq_scheme({"bits": 4, "group_size": 128, "desc_act": True})
    with pytest.raises(UnsupportedModelError) as e:
        format_from_config({"quant_method": "awq", "bits": 4})
    assert "awq" in _one_line(e)


# ------------------------------------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("bits, group, sym", SCHEMES + [(4, 16, False)])
@pytest.mark.parametrize("out, in_", [(32, 64), (24, 40)])  # 40 * 4 bits: a partly filled last word
def test_compressed_tensors_round_trip_and_reference(bits, group, sym, out, in_):
    if group and in_ % group:
        pytest.skip("group does not divide in")
    q = Q.quantize(_w(out, in_), Q.QuantScheme(bits, group, sym), scale_dtype=torch.bfloat16)
    t = CT.compressed_tensors_pack(q)
    assert ("weight_zero_point" in t) == (not sym)
    back = CT.compressed_tensors_unpack(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                       t.get("weight_zero_point"), bits=bits, group_size=group, symmetric=sym)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales) and torch.equal(back.zeros, q.zeros)
    ref = R.ref_compressed_tensors_dequantize(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                              t.get("weight_zero_point"), bits, group)
    assert torch.equal(Q.dequantize(back), ref)
    assert torch.equal(t["weight_packed"], ct_pack(q.codes, bits))  # the fixture's independent packer


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_library_is_the_oracle(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = Q.quantize(_w(24, 40), Q.QuantScheme(bits, 8, False))
    t = CT.compressed_tensors_pack(q)
    signed = (q.codes.int() - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(t["weight_packed"], helpers.pack_to_int32(signed, bits))
    zp = (q.zeros.int() - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(t["weight_zero_point"], helpers.pack_to_int32(zp, bits, packed_dim=0))
    assert torch.equal(helpers.unpack_from_int32(t["weight_packed"], bits, torch.Size([24, 40])), signed)


def test_compressed_tensors_errors_name_the_tensor():
    q = Q.quantize(_w(32, 48), Q.QuantScheme(4, 8, False))
    t = CT.compressed_tensors_pack(q)
    kw = {"bits": 4, "group_size": 8, "symmetric": False, "name": "model.layers.1.mlp.experts.0.down_proj"}
    with pytest.raises(CheckpointError) as e:
        CT.compressed_tensors_unpack(t["weight_packed"], t["weight_scale"][:, :3], t["weight_shape"],
                                    t["weight_zero_point"], **kw)
    assert "experts.0.down_proj.weight_scale" in _one_line(e) and "[32, 6]" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        CT.compressed_tensors_unpack(t["weight_packed"], t["weight_scale"], t["weight_shape"], None, **kw)
    assert "weight_zero_point" in _one_line(e)
    with pytest.raises(CheckpointError):
        CT.compressed_tensors_unpack(t["weight_packed"][:, :-1], t["weight_scale"], t["weight_shape"],
                                    t["weight_zero_point"], **kw)


def test_compressed_tensors_config_round_trips_through_its_parser():
    for scheme in (Q.parse_scheme("int4-g32"), Q.parse_scheme("int4-g128-asym"), Q.parse_scheme("int8")):
        config = CT.compressed_tensors_config(scheme, ignore=["lm_head"])
        assert _method_and_scheme(config) == ("compressed-tensors", scheme)
    kimi = REAL_CONFIGS["kimi-k2.6"]
    assert CT.compressed_tensors_scheme(kimi) == Q.QuantScheme(4, 32, True)
    assert CT.compressed_tensors_config(Q.QuantScheme(4, 32, True), kimi["ignore"]) == kimi  # what we write = Kimi's
    assert CT.compressed_tensors_ignored("model.layers.3.self_attn.q_a_proj", kimi["ignore"])
    assert CT.compressed_tensors_ignored("model.layers.0.mlp.gate_proj", kimi["ignore"])  # the dense first layer
    assert not CT.compressed_tensors_ignored("model.layers.3.mlp.experts.7.gate_proj", kimi["ignore"])


# ------------------------------------------------------------------------------------------------ fixtures


def _quantized_names(tensors: dict, suffix: str) -> list[str]:
    return sorted(k.removesuffix(suffix) for k in tensors if k.endswith(suffix))


@pytest.mark.parametrize("family, bits, group, sym", [("mixtral", 4, 8, True), ("qwen2_moe", 8, None, False),
                                                      ("qwen3_moe", 4, 8, False)])
def test_gptq_fixture_reads_back(tiny_dir, tmp_path, family, bits, group, sym):
    deq = write_gptq(tiny_dir(family), tmp_path, bits, group, sym)
    tensors = load_state_dict(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert _method_and_scheme(config["quantization_config"]) == ("gptq", Q.QuantScheme(bits, group, sym))
    names = _quantized_names(tensors, ".qweight")
    assert any(".experts." in n for n in names) and any("self_attn.o_proj" in n for n in names)
    assert not any(n.endswith(".gate") for n in names) and "lm_head.weight" in tensors  # routers, head stay plain
    for name in names:
        assert f"{name}.weight" not in tensors
        q = G.gptq_unpack(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                          tensors[f"{name}.g_idx"], bits, group or -1, name=name, shape=deq[f"{name}.weight"].shape)
        assert torch.equal(Q.dequantize(q), deq[f"{name}.weight"]), name


@pytest.mark.parametrize("family, bits, group, sym", [("olmoe", 4, 8, True), ("mixtral", 8, 8, False)])
def test_compressed_tensors_fixture_reads_back(tiny_dir, tmp_path, family, bits, group, sym):
    deq = write_compressed_tensors(tiny_dir(family), tmp_path, bits, group, sym)
    tensors = load_state_dict(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert _method_and_scheme(config) == ("compressed-tensors", Q.QuantScheme(bits, group, sym))
    names = _quantized_names(tensors, ".weight_packed")
    assert names and all(".experts." in n for n in names)
    for name in names:
        q = CT.compressed_tensors_unpack(tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"],
                                        tensors[f"{name}.weight_shape"], tensors.get(f"{name}.weight_zero_point"),
                                        bits=bits, group_size=group, symmetric=sym, name=name)
        assert torch.equal(Q.dequantize(q), deq[f"{name}.weight"]), name
        assert not CT.compressed_tensors_ignored(name, config["ignore"])


@pytest.mark.parametrize("family, bits", [("mixtral", 4), ("qwen2_moe", 8)])
def test_transformers_loads_compressed_tensors_fixture(tiny_dir, tmp_path, family, bits):
    """transformers (with compressed-tensors) decompresses the fixture into the same logits as the dequantized
    float32 checkpoint. Symmetric only: transformers 5.24 drops weight_zero_point when it decompresses fused MoE
    experts. float32 scales: it decompresses experts in the scale dtype, and bf16 scales would round the weights."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    src = tiny_dir(family)
    deq = write_compressed_tensors(src, tmp_path / "ct", bits, 8, True, scale_dtype=torch.float32)
    write_dequantized(src, tmp_path / "deq", deq)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 3, 60]])
    logits = []
    for path in (tmp_path / "ct", tmp_path / "deq"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    # the same float32 weights through the same modules: equal up to a few ulps (0 or 2.4e-7 observed)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_formats_and_portable_path_on_cuda():
    q = Q.quantize(_w(64, 256), Q.QuantScheme(4, 32, False), scale_dtype=torch.float16)
    x = _w(3, 256, seed=1)
    want = F.linear(x, Q.dequantize(q))
    ct = {k: v.cuda() for k, v in CT.compressed_tensors_pack(q, torch.float16).items()}
    back = CT.compressed_tensors_unpack(ct["weight_packed"], ct["weight_scale"], ct["weight_shape"],
                                       ct["weight_zero_point"], bits=4, group_size=32, symmetric=False)
    gptq = {k: v.cuda() for k, v in G.gptq_pack(q).items()}
    back_gptq = G.gptq_unpack(gptq["qweight"], gptq["qzeros"], gptq["scales"], gptq["g_idx"], 4, 32)
    for b in (back, back_gptq):
        assert b.codes.is_cuda and torch.equal(b.codes.cpu(), q.codes) and torch.equal(b.zeros.cpu(), q.zeros)
        # float32 matmuls on two devices: a few ulps apart (TF32 is off by default for matmuls)
        torch.testing.assert_close(F.linear(x.cuda(), Q.dequantize(b)).cpu(), want, rtol=1e-5, atol=1e-5)
