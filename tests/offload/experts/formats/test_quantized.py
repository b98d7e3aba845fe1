"""Quantized checkpoints end to end (offload/experts/formats and the runtime around it): GPTQ and
compressed-tensors checkpoints as released load without conversion, and offload computes what
transformers computes on the dequantized weights, at every budget, tier and batch shape.

Tolerances. With ``quant_activations="float32"`` every quantized matrix is dequantized and multiplied
in float32, the same math transformers runs on the dequantized checkpoint, so logits agree within
1e-4 as in test_model.py (the reference dequantizes with the same bf16/fp16 scales, so only the
product order differs) and greedy tokens are identical. The default int8 path quantizes each block of
activations to int8 inside offload's kernels (absmax / 127 steps: a relative error up to 1/254 per
input, ~0.5-1% of a matmul's output scale on random data, tests/offload/experts/kernels), so logits of
these unit-scale tiny models move by up to ~5e-2; checked at 0.1. int16 activations are 256x finer.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import offload
from offload.errors import BudgetError, CheckpointError, UnsupportedModelError
from offload.experts.formats.integer import DequantMatrix, KernelMatrix
from tests import reference
from tests.offload.model.test_forward import _min_gap, _prompts
from tests.quant_checkpoints import tiny_qwen3_moe, write_compressed_tensors, write_dequantized, write_gptq

NEW_TOKENS = 8
FORMATS = {"gptq": write_gptq, "compressed-tensors": write_compressed_tensors}


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """(family, format, bits, sym) -> (quantized checkpoint, its dequantized float32 twin), made once."""
    made: dict = {}

    def get(family: str, fmt: str, bits: int, sym: bool, group: int | None = 8, src=None):
        key = (family, fmt, bits, sym, group, str(src))
        if key not in made:
            src_dir = src or tiny_dir(family)
            root = tmp_path_factory.mktemp(f"{family}-{fmt}-{bits}-{sym}")
            state = FORMATS[fmt](src_dir, root / "q", bits=bits, group_size=group, sym=sym)
            made[key] = (root / "q", write_dequantized(src_dir, root / "deq", state))
        return made[key]

    return get


def _transformers(path, ids, mask):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores, 1), ref(ids, attention_mask=mask).logits


CASES = [("mixtral", "gptq", 4, True), ("mixtral", "gptq", 8, False), ("qwen3_moe", "gptq", 4, False),
         ("qwen3_moe", "gptq", 8, True), ("mixtral", "compressed-tensors", 4, True),
         ("qwen3_moe", "compressed-tensors", 4, False), ("qwen2_moe", "compressed-tensors", 8, True)]


@pytest.mark.parametrize("family, fmt, bits, sym", CASES)
def test_tokens_and_logits_equal_transformers_on_the_dequantized_weights(quantized, family, fmt, bits, sym):
    qdir, deq = quantized(family, fmt, bits, sym)
    for batch in (1, 3):
        ids, mask = _prompts(batch)
        ref_tokens, ref_scores, ref_logits = _transformers(deq, ids, mask)
        assert _min_gap(ref_scores, ref_tokens) > 10 * 1e-4
        for budget, tier in ((1, "disk"), ("25%", "ram"), ("100%", "disk"), (1, "ram")):
            model = offload.from_pretrained(qdir, device="cpu", expert_budget=budget, offload_to=tier,
                                            quant_activations="float32")
            assert model.plan.expert_format.name.endswith(f"({fmt})")
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=2,
                                    pad_token_id=0)
            assert torch.equal(tokens, ref_tokens), (budget, tier, batch)
            real = mask.bool()
            torch.testing.assert_close(model(ids, attention_mask=mask)[real], ref_logits[real], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def kernel_sized(tmp_path_factory):
    """A tiny Qwen3-MoE whose expert matrices meet torch's CPU kernels' constraints (64 x 64, groups of 32)."""
    return tiny_qwen3_moe(tmp_path_factory.mktemp("kernel-sized"))


# int8 activations: up to 1/254 relative per input, ~1% of the output's scale at most here; int16: 256x finer
ACTIVATION_TOLERANCE = {"int8": 0.02, "int16": 1e-4}


@pytest.mark.parametrize("bits, group, activations", [(4, 32, "int8"), (8, None, "int8"), (4, 64, "int16")])
@pytest.mark.parametrize("tier", ["disk", "ram"])
def test_cpu_kernels_run_what_the_dequantized_path_runs(quantized, kernel_sized, bits, group, activations, tier):
    qdir, _ = quantized("kernel", "compressed-tensors", bits, True, group, src=kernel_sized)
    fast = offload.from_pretrained(qdir, device="cpu", expert_budget=3, offload_to=tier,
                                   quant_activations=activations)
    exact = offload.from_pretrained(qdir, device="cpu", expert_budget=3, offload_to=tier,
                                    quant_activations="float32")
    assert all(isinstance(m, KernelMatrix) and m.activations == activations
               for m in fast.cache.mover.slot_layout.matrices)
    assert all(isinstance(m, DequantMatrix) for m in exact.cache.mover.slot_layout.matrices)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for key in fast.plan.experts:  # every expert through both paths (misses, evictions and conversions included)
        a, b = fast.cache.acquire(key), exact.cache.acquire(key)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            want = getattr(b, proj)(x)
            tolerance = ACTIVATION_TOLERANCE[activations] * float(want.abs().max())
            torch.testing.assert_close(getattr(a, proj)(x), want, atol=tolerance, rtol=0)
        fast.cache.release(key)
        exact.cache.release(key)
    routes: dict[str, list] = {"fast": [], "exact": []}
    for name, model in (("fast", fast), ("exact", exact)):
        model.model.route_observers.append(lambda layer, e, w, name=name: routes[name].append(e.clone()))
    ids = torch.tensor([[5, 17, 33, 60, 8, 9, 10]])
    logits_fast, logits_exact = fast(ids), exact(ids)
    # An activation's rounding can flip a near-tied router choice of these random models: most choices agree, and
    # at the tokens routed alike in every layer the logits stay close.
    same = torch.stack([(r.sort(-1).values == s.sort(-1).values).all(-1)
                        for r, s in zip(routes["fast"], routes["exact"], strict=True)])  # [layers, tokens]
    assert same.float().mean() >= 0.9
    alike = same.all(0)
    torch.testing.assert_close(logits_fast[0, alike], logits_exact[0, alike], atol=0.1, rtol=0)


def test_budgets_count_quantized_bytes(quantized, kernel_sized):
    qdir, _ = quantized("kernel", "compressed-tensors", 4, True, 32, src=kernel_sized)
    model = offload.from_pretrained(qdir, device="cpu", expert_budget="30KiB")
    # int4 as the kernels read it: 3 x (64 x 64 / 2 nibbles + float32 scale and min per 32 inputs and row)
    assert model.cache.slot_nbytes == 3 * (64 * 32 + 2 * 64 * 2 * 4) == 9216
    assert model.cache.num_slots == 30 * 1024 // 9216 == 3 and model.cache.resident_nbytes <= 30 * 1024
    model.generate(torch.tensor([[5, 17, 33, 60, 8]]), max_new_tokens=4)
    assert model.cache.resident_nbytes <= 30 * 1024 and model.stats.total.evictions > 0
    with pytest.raises(BudgetError, match="smaller than one expert"):  # the float32 experts take 49 KiB each
        offload.from_pretrained(kernel_sized, device="cpu", expert_budget="30KiB")


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_formats_and_bad_tensors_are_one_line_errors(quantized, tmp_path):
    qdir, _ = quantized("mixtral", "gptq", 4, True)
    with pytest.raises(UnsupportedModelError, match="quantization method 'awq' is not supported"):
        offload.plan_checkpoint(_edit_config(qdir, tmp_path / "awq", quant_method="awq"))
    with pytest.raises(CheckpointError, match="qweight' in model.safetensors has shape"):
        offload.plan_checkpoint(_edit_config(qdir, tmp_path / "bits", bits=8))  # the tensors are 4-bit
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(qdir, tmp_path / "actorder")
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.0.w1.g_idx"
    tensors[name] = torch.flip(tensors[name], [0]).contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="act-order"):
        offload.plan_checkpoint(bad)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.scales"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="experts.2.w3.scales' is missing"):
        offload.plan_checkpoint(bad)


def test_prefetching_and_batching_work_on_quantized_experts(quantized):
    qdir, _ = quantized("qwen3_moe", "gptq", 4, False)
    prompts = [[5, 17, 33, 60, 8], [9, 8, 7], [40, 41, 42, 43]]
    plain = offload.from_pretrained(qdir, device="cpu", expert_budget=4, quant_activations="float32")
    alone = [plain.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=[])[0, len(p):].tolist()
             for p in prompts]
    for predictor in ("pregate", "markov"):
        model = offload.from_pretrained(qdir, device="cpu", expert_budget=4, quant_activations="float32",
                                        predictor=predictor, lookahead=2)
        out = model.generate_many(prompts, max_new_tokens=6, batch_size=2, scheduler="expert-aware", eos_token_id=[])
        assert [c.token_ids for c in out] == alone
        assert model.stats.total.prefetch_issued > 0
        model.cache.close()


@pytest.mark.gpu
def test_cuda_dequantizes_into_the_compute_dtype(quantized):
    """On CUDA every quantized matrix uses the portable layout (dequantize per matmul, on the GPU)."""
    qdir, deq = quantized("qwen3_moe", "compressed-tensors", 4, False)
    ids, mask = _prompts(3)
    cpu = offload.from_pretrained(qdir, device="cpu", quant_activations="float32")
    gpu = offload.from_pretrained(qdir, device="cuda", expert_budget=2, quant_activations="float32")
    assert all(isinstance(m, DequantMatrix) for m in gpu.cache.mover.slot_layout.matrices)
    real = mask.bool()
    # float32 on both devices: cuBLAS and the CPU's GEMM sum in different orders (~1e-6); 1e-4 as elsewhere
    torch.testing.assert_close(gpu(ids, attention_mask=mask).cpu()[real], cpu(ids, attention_mask=mask)[real],
                               atol=1e-4, rtol=0)
    assert torch.equal(gpu.generate(ids, attention_mask=mask, max_new_tokens=6).cpu(),
                       cpu.generate(ids, attention_mask=mask, max_new_tokens=6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_dequantize_equals_the_bitwise_reference(dtype):
    from offload.experts.formats.mxfp4 import mxfp4_dequantize

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (6, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (6, 3), dtype=torch.uint8, generator=g)  # 2^-17 .. 2^12
    # every value is exact in float32 and bfloat16 (a 2-bit mantissa times a power of two); float16 rounds once
    expected = reference.ref_mxfp4_dequantize(blocks, scales).to(dtype)
    assert torch.equal(mxfp4_dequantize(blocks, scales, dtype), expected)


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])  # whole blocks, and ragged edge blocks
def test_fp8_block_dequantize_equals_the_bitwise_reference(shape):
    from offload.experts.formats.fp8 import fp8_block_dequantize

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 50).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g) + 0.01
    ours = fp8_block_dequantize(w, scale_inv, (128, 128))
    # float32 product of an exact e4m3 value and a float32 scale: rounded once, as float64 -> float32
    assert torch.equal(ours, reference.ref_fp8_block_dequantize(w.view(torch.uint8), scale_inv, (128, 128)).float())


@pytest.mark.parametrize("fmt_name", ["mxfp4", "fp8"])
def test_vendor_formats_dense_slot_on_cpu_computes_as_the_native_bytes(fmt_name):
    """A CPU slot dequantizes a vendor-format expert once; a GPU slot (and the hybrid's host copy) keeps the
    native bytes and dequantizes per matmul. Both must compute the same projections."""
    from types import SimpleNamespace

    from offload.experts.formats.fp8 import Fp8BlockFormat
    from offload.experts.formats.mxfp4 import Mxfp4Format
    from offload.experts.layouts import DenseMatrix

    spec = SimpleNamespace(hidden_size=64, expert_intermediate_size=96)
    fmt = Mxfp4Format() if fmt_name == "mxfp4" else Fp8BlockFormat(block=(32, 32))
    cpu = torch.device("cpu")
    native = fmt.host_layout(spec, torch.float32, cpu, "float32")
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(native.nbytes, dtype=torch.uint8)
    for m in native.matrices:
        for part in m.parts:
            if part.dtype == torch.uint8:  # MXFP4 blocks and scales (2^-8 .. 2^3)
                low = 119 if part is m.scales else 0
                part.view(buf).copy_(torch.randint(low, 131 if low else 256, part.shape, generator=g))
            elif part.dtype == torch.float8_e4m3fn:
                part.view(buf).copy_(torch.randn(part.shape, generator=g).to(part.dtype))
            else:
                part.view(buf).copy_(torch.rand(part.shape, generator=g) + 0.5)
    slot = fmt.slot_layout(spec, torch.float32, cpu, "float32")
    assert all(isinstance(m, DenseMatrix) for m in slot.matrices) and slot.nbytes > native.nbytes
    assert fmt.slot_layout(spec, torch.float32, torch.device("meta"), "float32") == native  # not a CPU: native
    dest = torch.zeros(slot.nbytes, dtype=torch.uint8)
    slot.convert_from(native, buf, dest)
    x = torch.randn(3, 64, generator=g)
    ours, theirs = slot.bind(dest), native.bind(buf)
    # the same float32 weights on both sides; the slot runs offload's GEMV, the native side F.linear: float32 sums in
    # another order, ~1e-7 relative per term, so 1e-5 of the output's scale
    h = torch.randn(3, 96, generator=g)
    for proj, inp in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
        want = getattr(theirs, proj)(inp)
        torch.testing.assert_close(getattr(ours, proj)(inp), want, rtol=0, atol=1e-5 * float(want.abs().max()))
