"""offload/experts/kernels (rows.py through linear.py) against tests/reference.py's dequantize-then-float32 matmul.

Tolerances, per activation mode (errors measured against the reference's output scale, max |y|):
- float weights: float32 sums of exact products in another order, ~1e-7 relative per term: 1e-5. Outputs in bf16 /
  f16 are then rounded once (2^-8 / 2^-11 relative), which the comparison in that dtype allows (one unit).
- int16 activations: each input is rounded to 1/32767 of its block's absmax, ~1e-5 of the output scale observed
  (2-4e-5 max on random data): 2e-4.
- int8 activations: 1/127 of the block's absmax, 0.5-1% observed: 3e-2. A wrong nibble order, scale or zero point
  gives errors of order 1.
Calls above INT_MAX_TOKENS run dequantize + F.linear in the activations' dtype (float32 here): 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numba
import numpy as np
import pytest
import torch

from offload.experts import quant as Q
from offload.experts.formats.mxfp4 import mxfp4_dequantize
from offload.experts.kernels import linear as L
from offload.experts.kernels import rows, vectors
from tests import reference as R
from tests.gguf_checkpoints import random_blocks

TOLERANCE = {"int8": 3e-2, "int16": 2e-4}
SHAPES = [(96, 512), (512, 256)]  # both orientations of an expert (gate/up [I, H], down [H, I])
TOKENS = [1, 3, 8, 17]  # 17 > INT_MAX_TOKENS: the dequantizing fallback


def _w(out: int, in_: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, in_, generator=torch.Generator().manual_seed(seed))


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (4, 128), (4, 256), (4, None), (8, None), (8, 64)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activations", ["int8", "int16"])
def test_int_linear_matches_dequantized_reference(bits, group, sym, shape, activations):
    q = Q.quantize(_w(*shape, seed=bits + (group or 0)), Q.QuantScheme(bits, group, sym))
    lin = L.int_linear(q, activations)
    ref_w = R.ref_dequantize(q.codes, q.scales, q.zeros, group)
    for tokens in TOKENS:
        x = _w(tokens, shape[1], seed=tokens)
        y = lin(x)
        assert y.shape == (tokens, shape[0]) and y.dtype == x.dtype
        tolerance = TOLERANCE[activations] if tokens <= L.INT_MAX_TOKENS else 1e-5
        assert _err(y, R.ref_linear(x, ref_w)) < tolerance, tokens


def test_int_linear_keeps_leading_dims_and_dtype():
    q = Q.quantize(_w(64, 128), Q.QuantScheme(4, 32, False))
    x = _w(6, 128).view(2, 3, 128).to(torch.bfloat16)
    y = L.int_linear(q)(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_float_linear_matches_reference(dtype, shape):
    w = _w(*shape).to(dtype)
    bias = _w(1, shape[0], seed=5)[0].to(dtype)
    for tokens in TOKENS:
        x = _w(tokens, shape[1], seed=tokens).to(dtype)
        assert L.float_kernel_runs(x, w) == (tokens <= L.FLOAT_MAX_TOKENS)
        y = L.float_linear(x, w, bias)
        ref = R.ref_linear(x, w) + bias.float()
        assert y.dtype == dtype and y.shape == (tokens, shape[0])
        unit = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 1e-6}[dtype]
        torch.testing.assert_close(y.float(), ref, rtol=2 * unit, atol=(2 * unit + 1e-5) * float(ref.abs().max()))


def test_float_linear_leaves_what_it_cannot_run_to_torch():
    w = _w(64, 32).t()  # not contiguous
    x = _w(2, 64)
    assert not L.float_kernel_runs(x, w)
    torch.testing.assert_close(L.float_linear(x, w), x @ w.t())


def test_quantize_rows_is_symmetric_per_block_and_exact_in_its_sums():
    x = _w(3, 256).numpy()
    xq = np.empty((3, 256), np.int8)
    xs = np.empty((3, 4), np.float32)
    xz = np.empty_like(xs)
    rows.quantize_rows(x, 64, xq, xq, xs, xz, 127, rows.WHOLE)
    blocks = x.reshape(3, 4, 64)
    np.testing.assert_allclose(xs, np.abs(blocks).max(-1) / 127, rtol=1e-6)
    assert np.abs(xq).max() == 127 and np.abs(xq.reshape(3, 4, 64) * xs[..., None] - blocks).max() <= xs.max() / 2
    np.testing.assert_allclose(xz, xs * xq.reshape(3, 4, 64).astype(np.int64).sum(-1), rtol=1e-6)
    xe, xo = np.empty((3, 128), np.int8), np.empty((3, 128), np.int8)  # int4's order: even and odd inputs apart
    rows.quantize_rows(x, 64, xe, xo, xs, xz, 127, rows.EVEN_ODD)
    assert np.array_equal(xe, xq[:, 0::2]) and np.array_equal(xo, xq[:, 1::2])
    zero = np.zeros((1, 64), np.float32)  # an all-zero block: scale 0, codes 0, no division by zero
    rows.quantize_rows(zero, 64, xq[:1, :64], xq[:1, :64], xs[:1, :1], xz[:1, :1], 127, rows.WHOLE)
    assert xs[0, 0] == 0 and not xq[0, :64].any()


@numba.njit
def _avx2_rows(w, s, m, x, xo, xs, xz, y):
    rows.int8_activation_rows(w, s, m, x, xo, xs, xz, y, 0, w.shape[0])


@pytest.mark.skipif(not vectors.AVX2, reason="the host has no AVX2: int8_activation_rows is int_rows there")
@pytest.mark.parametrize("bits, group, k", [
    (4, 32, 512),    # 16-byte blocks, four per 32-byte load (sums4)
    (4, 64, 512),    # 32-byte blocks (sums8)
    (4, 128, 640),   # 64-byte blocks, 8 in vectors and 2 past them (the tail)
    (8, 32, 256),    # llama.cpp's Q8_0 shape
    (8, 64, 640),
    (8, None, 2048),  # one scale per row, 8 activation blocks of 256
    (8, None, 1024),  # one scale per row, 4 blocks: all tail
    (4, 32, 96),     # 3 blocks: not a multiple of 8, the portable loops
])
@pytest.mark.parametrize("tokens", [1, 3])
def test_avx2_rows_equal_the_portable_rows(bits, group, k, tokens):
    """The AVX2 kernels against int_rows on the same codes: integer dots are exact in both, only the float sums of
    the blocks run in another order (~1e-7 relative each): 1e-5. 37 rows: a row count no split lines up with."""
    rng = np.random.default_rng(bits * k + tokens)
    n, group = 37, group or k
    block = L.act_block(group)
    if bits == 4:
        w = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
        x, xo = (rng.integers(-127, 128, (tokens, k // 2), dtype=np.int8) for _ in range(2))
    else:
        w = rng.integers(-128, 128, (n, k), dtype=np.int8)
        x = xo = rng.integers(-127, 128, (tokens, k), dtype=np.int8)
    s, m = (rng.random((n, k // group), dtype=np.float32) for _ in range(2))
    xs, xz = (rng.random((tokens, k // block), dtype=np.float32) for _ in range(2))
    fast, portable = np.full((tokens, n), np.nan, np.float32), np.full((tokens, n), np.nan, np.float32)
    _avx2_rows(w, s, m, x, xo, xs, xz, fast)
    rows.int_rows(w, s, m, x, xo, xs, xz, portable, 0, n)
    np.testing.assert_allclose(fast, portable, rtol=1e-5, atol=1e-5 * float(np.abs(portable).max()))


def _ggml(kind: str, n: int, k: int, seed: int) -> tuple[L.BlockLinear, torch.Tensor]:
    """A BlockLinear over ggml blocks (quantized by ggml-org's own package, or random K-quant fields), and their
    float32 decoding by that package (the oracle)."""
    rng = np.random.default_rng(seed)
    if kind in ("Q4_K", "Q6_K"):  # gguf's package decodes the K types but does not quantize them
        raw = random_blocks(kind, n, k, rng)
    else:
        w = rng.standard_normal((n, k)).astype(np.float32)
        raw = np.ascontiguousarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(n, k)
    return L.BlockLinear(torch.from_numpy(raw).view(torch.uint8), kind, k), torch.from_numpy(ref)


GGML_SHAPES = {"Q8_0": [(37, 256), (64, 320), (40, 96)],  # 8 blocks; 8 + a tail of 2; a tail of 3 only
               "Q4_K": [(37, 256), (64, 512), (40, 768)]}  # super-blocks of 256: one, two, three
GGML_CASES = [(kind, n, k) for kind in ("Q8_0", "Q4_0", "Q4_K", "Q6_K", "MXFP4")
              for n, k in GGML_SHAPES["Q4_K" if kind.endswith("_K") else "Q8_0"]]


@pytest.mark.parametrize("kind, n, k", GGML_CASES)
def test_ggml_blocks_match_ggml_orgs_decoding(kind, n, k):
    """GGUF's Q8_0 / Q4_0 / Q4_K / Q6_K / MXFP4 rows as the file stores them, against gguf.quants.dequantize then a
    float64 matmul: int8 activations per block of 32 (3e-2, as for int4/int8 above), exact decoding above
    INT_MAX_TOKENS (1e-5)."""
    _check_int8_linear(*_ggml(kind, n, k, seed=k))


def test_a_large_block_matrix_is_dequantized_in_row_chunks_above_the_kernels_range(monkeypatch):
    """Above INT_MAX_TOKENS a BlockLinear dequantizes DEQUANTIZE_ROWS rows at a time (a 152k-row lm_head never needs
    its whole float32 copy): the same product as the whole dequantized matrix, to float32 summation order."""
    lin, ref = _ggml("Q4_K", 37, 256, seed=5)
    x = _w(17, 256, seed=1)
    whole = lin(x)
    monkeypatch.setattr(L, "DEQUANTIZE_ROWS", 16)  # 37 rows: chunks of 16, 16 and 5
    torch.testing.assert_close(lin(x), whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))
    torch.testing.assert_close(lin(x.bfloat16()).float(), R.ref_linear(x.bfloat16().float(), ref).float(),
                               rtol=0, atol=1e-2 * float(whole.abs().max()))


def _check_int8_linear(lin, ref_w: torch.Tensor) -> None:
    """A kernel with int8 activations against its weights' float32 decoding ``ref_w``: the exact dequantization, then
    every token count within int8 activations' 3e-2 (1e-5 above INT_MAX_TOKENS, dequantized), in the input's dtype."""
    n, k = ref_w.shape
    assert torch.equal(lin.dequantized(torch.float32), ref_w)
    for tokens in TOKENS:
        x = _w(tokens, k, seed=tokens)
        y = lin(x)
        assert y.shape == (tokens, n) and y.dtype == x.dtype
        tolerance = TOLERANCE["int8"] if tokens <= L.INT_MAX_TOKENS else 1e-5
        assert _err(y, R.ref_linear(x, ref_w)) < tolerance, tokens
    assert lin(_w(2, k).bfloat16()).dtype == torch.bfloat16


@numba.njit
def _ggml_rows(kind, w, x, xo, xs, xz, fast, portable):
    n = w.shape[0]
    rows.ggml_rows(w, x, xo, xs, xz, fast, 0, n, kind)
    rows.ggml_portable(w, x, xo, xs, xz, portable, 0, n, kind)


@pytest.mark.skipif(not vectors.AVX2, reason="the host has no AVX2: the ggml kernels are the portable ones there")
@pytest.mark.parametrize("kind, n, k", GGML_CASES)
def test_avx2_ggml_rows_equal_the_portable_rows(kind, n, k):
    """Same codes, both kernels: exact integer dots, float sums in another order (1e-5)."""
    lin, _ = _ggml(kind, n, k, seed=1)
    rng = np.random.default_rng(k)
    tokens, blocks = 3, k // 32
    half = kind in ("Q4_0", "MXFP4")
    x = rng.integers(-127, 128, (tokens, k // 2 if half else k), dtype=np.int8)
    xo = rng.integers(-127, 128, x.shape, dtype=np.int8)
    xs, xz = (rng.random((tokens, blocks), dtype=np.float32) for _ in range(2))
    fast, portable = (np.full((tokens, n), np.nan, np.float32) for _ in range(2))
    _ggml_rows(L.GGML_KINDS[kind][1], lin.blocks.numpy(), x, xo, xs, xz, fast, portable)
    np.testing.assert_allclose(fast, portable, rtol=1e-5, atol=1e-5 * float(np.abs(portable).max()))


def _mxfp4_plain(n: int, k: int, seed: int) -> tuple[L.Mxfp4Linear, torch.Tensor]:
    """Random gpt-oss-style MXFP4 (codes [N, K/32, 16], exponents around 2^0) and its float32 decoding by
    formats/mxfp4.py's byte-pair table, written independently of the kernels."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, 16), generator=g, dtype=torch.uint8)
    exponents = torch.randint(118, 131, (n, k // 32), generator=g, dtype=torch.uint8)
    return L.Mxfp4Linear(blocks.view(n, k // 2), exponents), mxfp4_dequantize(blocks, exponents, torch.float32)


@pytest.mark.parametrize("n, k", [(37, 256), (64, 320), (40, 96)])  # 8 blocks; 8 + a tail of 2; a tail of 3 only
def test_mxfp4_as_gpt_oss_stores_it_matches_the_dequantized_reference(n, k):
    """gpt-oss's MXFP4 layout (even / odd nibbles, exponents apart) with int8 activations per 32 (3e-2), exact above
    INT_MAX_TOKENS (1e-5)."""
    _check_int8_linear(*_mxfp4_plain(n, k, seed=k))


@numba.njit
def _mxfp4_rows(w, e, xe, xo, xs, fast, portable):
    rows.mxfp4_rows(w, e, xe, xo, xs, fast, 0, w.shape[0])
    rows.mxfp4_portable(w, e, xe, xo, xs, portable, 0, w.shape[0])


@pytest.mark.skipif(not vectors.AVX2, reason="the host has no AVX2: the MXFP4 kernel is the portable one there")
@pytest.mark.parametrize("k", [256, 320, 96])
def test_avx2_mxfp4_rows_equal_the_portable_rows(k):
    lin, _ = _mxfp4_plain(37, k, seed=1)
    rng = np.random.default_rng(k)
    xe, xo = (rng.integers(-127, 128, (3, k // 2), dtype=np.int8) for _ in range(2))
    xs = rng.random((3, k // 32), dtype=np.float32)
    fast, portable = (np.full((3, 37), np.nan, np.float32) for _ in range(2))
    _mxfp4_rows(lin.codes.numpy(), lin.exponents.numpy(), xe, xo, xs, fast, portable)
    np.testing.assert_allclose(fast, portable, rtol=1e-5, atol=1e-5 * float(np.abs(portable).max()))


@numba.njit
def _to_bf16(values, out):
    for i in range(values.size):
        rows.store(out, 0, i, values[0, i])


def test_bf16_outputs_round_to_nearest_even_like_torch():
    """The kernels write bf16 results themselves: bit for bit what torch's float32 -> bf16 conversion gives,
    ties (low half exactly 0x8000) included."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (1, 20000), generator=gen, dtype=torch.int64).to(torch.int32)
    bits[0, :1000] = (bits[0, :1000] & ~0xFFFF) | 0x8000  # exact ties, odd and even
    values = bits.view(torch.float32)
    values = values[:, ~torch.isnan(values[0]) & ~torch.isinf(values[0])]
    values = torch.cat([values, torch.tensor([[0.0, -0.0, 1e-40, 3.4e38, float("nan")]])], 1)
    out = np.empty(values.shape, np.uint16)
    _to_bf16(values.numpy(), out)
    expected = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(values.numpy())
    assert np.array_equal(out[finite], expected[finite])
    assert torch.isnan(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)[~torch.from_numpy(finite)]).all()


def _every_kernel_once() -> np.ndarray:
    """One small call of every kernel family, concatenated (the portable build's comparison)."""
    torch.manual_seed(0)
    out = []
    for bits, group in ((4, 128), (4, 32), (8, None)):
        q = Q.quantize(torch.randn(96, 256), Q.QuantScheme(bits, group, False))
        out.append(L.int_linear(q, "int8")(torch.randn(3, 256)).numpy())
    for kind in ("Q8_0", "Q4_0", "MXFP4"):
        raw = gguf.quants.quantize(torch.randn(96, 256).numpy(), gguf.GGMLQuantizationType[kind])
        out.append(L.BlockLinear(torch.from_numpy(raw).view(torch.uint8), kind, 256)(torch.randn(3, 256)).numpy())
    blocks = torch.randint(0, 256, (96, 256 // 2), dtype=torch.uint8)  # gpt-oss's MXFP4 layout
    scales = torch.randint(120, 130, (96, 8), dtype=torch.uint8)
    out.append(L.Mxfp4Linear(blocks, scales)(torch.randn(3, 256)).numpy())
    for kind, size in (("Q4_K", 144), ("Q6_K", 210)):  # random fields; f16 scales set finite
        raw = np.random.default_rng(0).integers(0, 256, (96, 2, size), dtype=np.uint8)
        half = np.full((96, 2, 2), 0.01, np.float16).view(np.uint8)
        raw[..., 0:4] = half.reshape(96, 2, 4) if kind == "Q4_K" else raw[..., 0:4]
        raw[..., 208:210] = half[..., 0:2] if kind == "Q6_K" else raw[..., 208:210]
        out.append(L.BlockLinear(torch.from_numpy(raw.reshape(96, -1)), kind, 512)(torch.randn(3, 512)).numpy())
    for dtype in (torch.bfloat16, torch.float16):  # float16: F16C's vcvtph2ps on the host, integer moves without it
        w = torch.randn(96, 256)
        w[0, :4] = torch.tensor([1e-6, -3e-5, 65504.0, -2.0**-24])  # subnormal and extreme halves
        out.append(L.float_linear(torch.randn(2, 256), w.to(dtype)).numpy())
    return np.concatenate([o.ravel() for o in out])


_GENERIC = "import sys, numpy; from tests.offload.experts.kernels.test_linear import _every_kernel_once as f; " \
           "numpy.save(sys.argv[1], f())"


@pytest.mark.slow  # compiles the kernels afresh for another CPU target: 1-3 minutes on 2 busy cores
def test_portable_build_equals_the_host_build(tmp_path):
    """NUMBA_CPU_NAME=generic compiles the same loops for a baseline x86-64 (SSE2, no AVX2): what a CPU without AVX2
    runs; the host's results come from this process's kernels. Integer sums are exact on both, so only float
    accumulation order differs: 1e-5 relative."""
    out = tmp_path / "generic.npy"
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", _GENERIC, str(out)], check=True, timeout=600, env=env,
                   cwd=Path(__file__).parents[4])
    results = {"generic": np.load(out), "host": _every_kernel_once()}
    np.testing.assert_allclose(results["generic"], results["host"], rtol=1e-5,
                               atol=1e-5 * float(np.abs(results["host"]).max()))
