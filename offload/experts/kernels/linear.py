"""Linear layers on offload's CPU kernels: float weights (bf16, f16, f32) and integer ones (int4, int8), as stored.

A call with at most ``*_MAX_TOKENS`` tokens runs the row kernels (rows.py) on the process's pool (pool.py); a
longer one (prefill, big batches) goes to torch's GEMM, which reuses each weight across many tokens better than
a GEMV repeated per token. Integer weights are computed with quantized activations (``QUANT_ACTIVATIONS``):
``int8`` (llama.cpp's choice, the default) or ``int16`` (near exact); ``float32`` never reaches these kernels
(the format's dequantizing layout computes exactly instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from offload.experts.kernels import jobs, rows
from offload.experts.kernels.pool import pool
from offload.experts.quant import QuantizedWeight, pack_nibbles, unpack_nibbles

QUANT_ACTIVATIONS = ("int8", "int16", "float32")  # --quant-activations: what an integer weight multiplies
FLOAT_MAX_TOKENS = 16  # above: torch's GEMM (scripts/bench_kernels.py: ours is faster up to 16 tokens here)
INT_MAX_TOKENS = 16
ACT_BLOCKS = (256, 128, 64, 32)  # activation quantization block: the largest dividing the weight group
DEQUANTIZE_ROWS = 8192  # a block matrix above INT_MAX_TOKENS is dequantized this many rows at a time (BlockLinear)
_FLOAT_KINDS = {torch.bfloat16: jobs.BF16, torch.float16: jobs.F16, torch.float32: jobs.F32}
_INT_KINDS = {(4, "int8"): jobs.INT4_A8, (4, "int16"): jobs.INT4_A16, (8, "int8"): jobs.INT8_A8,
              (8, "int16"): jobs.INT8_A16}


def _call(base: np.ndarray, x: torch.Tensor, n: int) -> torch.Tensor:
    """Run the weight ``base`` (jobs.weight_base) on contiguous CPU activations x [..., K]: [..., n] in x.dtype."""
    tokens = x.numel() // int(base[jobs.K])
    direct = x.dtype != torch.float16  # f16 results leave as float32 and are rounded by torch
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype if direct else torch.float32)
    desc = base.copy()
    desc[jobs.TOKENS], desc[jobs.X], desc[jobs.XKIND] = tokens, x.data_ptr(), _FLOAT_KINDS[x.dtype]
    desc[jobs.Y], desc[jobs.YKIND] = y.data_ptr(), _FLOAT_KINDS[y.dtype]
    pool().run_job(desc)
    return y if direct else y.to(x.dtype)


def float_kernel_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether float_linear takes our kernel for this call (else torch's F.linear)."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2
            and weight.dtype in _FLOAT_KINDS and x.dtype in _FLOAT_KINDS and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1]
            and x.numel() <= FLOAT_MAX_TOKENS * x.shape[-1])


def float_job(weight: torch.Tensor) -> np.ndarray | None:
    """The weight half of the kernel job computing a float weight [N, K], or None where the kernels cannot read it."""
    if (weight.device.type != "cpu" or weight.dim() != 2 or weight.dtype not in _FLOAT_KINDS
            or not weight.is_contiguous()):
        return None
    return jobs.weight_base(_FLOAT_KINDS[weight.dtype], *weight.shape, weight.data_ptr())


def float_linear(x: torch.Tensor, weight: torch.Tensor | BlockLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with our GEMV at decode: float32 accumulation, the result in x.dtype.

    torch's bf16 matmul rounds the same float32 sums to bf16, so the two differ in the last bit at most where the
    summation order tips a rounding; float32 weights agree with torch's within ~1e-6 relative. ``weight`` may also be
    a GGUF matrix kept in its blocks (BlockLinear: a resident projection of a GGUF file, computed by its kernel).
    """
    if isinstance(weight, BlockLinear):
        out = weight(x)
        return out if bias is None else out + bias.to(out.dtype)
    if not float_kernel_runs(x, weight):  # a float32 x may meet a bf16 weight (routers score in float32)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    out = _call(float_job(weight), x.contiguous(), weight.shape[0])
    return out if bias is None else out + bias


def act_block(group: int) -> int:
    """Activation quantization block for a weight group: int16 sums stay far from int32 overflow at 256."""
    return next(b for b in ACT_BLOCKS if group % b == 0)


def int_kernel_runs(in_features: int, group: int) -> bool:
    """Whether the integer kernels take a matrix: weight groups (the whole row when per-channel) of 32n inputs."""
    return in_features % 32 == 0 and group % 32 == 0 and in_features % group == 0


@dataclass(frozen=True)
class IntLinear:
    """Integer codes as stored (int4 plain nibbles [N, K/2] or int8 [N, K]), W = s * q - m per weight group.

    ``codes``, ``scales`` and ``mins`` are contiguous views of a slot; ``dequantized`` is for calls above
    INT_MAX_TOKENS. The job descriptor's weight half is made once here, per bind.
    """

    codes: torch.Tensor   # uint8 [N, K/2] (int4) or int8 [N, K]
    scales: torch.Tensor  # float32 [N, K/group]
    mins: torch.Tensor    # float32 [N, K/group]: scale * zero point (in the codes' own range)
    activations: str      # "int8" or "int16"
    job: np.ndarray = field(init=False, repr=False, compare=False)  # its kernel job's weight half, made once

    def __post_init__(self) -> None:
        nibbles = self.codes.dtype == torch.uint8
        n, k = self.codes.shape[0], self.codes.shape[1] * (2 if nibbles else 1)
        groups = self.scales.shape[1]
        base = jobs.weight_base(_INT_KINDS[4 if nibbles else 8, self.activations], n, k, self.codes.data_ptr(),
                                groups, k // act_block(k // groups), self.scales.data_ptr(), self.mins.data_ptr())
        object.__setattr__(self, "job", base)

    @property
    def in_features(self) -> int:
        return int(self.job[jobs.K])

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in ``dtype`` (prefill's GEMM)."""
        q = unpack_nibbles(self.codes) if self.codes.dtype == torch.uint8 else self.codes
        n, k = q.shape
        groups = self.scales.shape[1]
        w = q.reshape(n, groups, k // groups).float().mul_(self.scales[..., None]).sub_(self.mins[..., None])
        return w.reshape(n, k).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > INT_MAX_TOKENS * self.in_features or x.device.type != "cpu" or x.dtype not in _FLOAT_KINDS:
            return F.linear(x, self.dequantized(x.dtype))
        return _call(self.job, x.contiguous(), self.codes.shape[0])


def int_linear(q: QuantizedWeight, activations: str = "int8") -> IntLinear:
    """An IntLinear owning its tensors, from a QuantizedWeight (benchmarks, tests; slots bind views instead)."""
    signed = q.scheme.bits == 8
    codes = (q.codes ^ 0x80).view(torch.int8) if signed else pack_nibbles(q.codes)
    zeros = q.zeros - 128 if signed else q.zeros
    return IntLinear(codes.contiguous(), q.scales.contiguous(), (q.scales * zeros).contiguous(), activations)


# ggml block types with a kernel (int8 activations): their job kind and rows.py's block kind
GGML_KINDS = {"Q8_0": (jobs.Q8_0_A8, rows.Q8_0), "Q4_0": (jobs.Q4_0_A8, rows.Q4_0),
              "Q4_K": (jobs.Q4_K_A8, rows.Q4_K), "Q6_K": (jobs.Q6_K_A8, rows.Q6_K),
              "MXFP4": (jobs.MXFP4_A8, rows.MXFP4)}


@dataclass(frozen=True)
class BlockLinear:
    """ggml blocks as a GGUF file stores them (``blocks`` uint8 [N, bytes per row], a view of a slot), computed with
    activations quantized per block of 32 to int8, as llama.cpp does; above INT_MAX_TOKENS dequantized once per call
    for torch's GEMM."""

    blocks: torch.Tensor
    kind: str           # a GGML_KINDS key: "Q8_0", "Q4_0", "Q4_K", "Q6_K", "MXFP4"
    in_features: int
    job: np.ndarray = field(init=False, repr=False, compare=False)  # its kernel job's weight half, made once

    def __post_init__(self) -> None:
        base = jobs.weight_base(GGML_KINDS[self.kind][0], self.blocks.shape[0], self.in_features,
                                self.blocks.data_ptr())
        object.__setattr__(self, "job", base)

    def dequantized(self, dtype: torch.dtype, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows lo..hi of W [N, K] in ``dtype``, exactly as ggml decodes them."""
        blocks = self.blocks[lo:hi]
        out = torch.empty((blocks.shape[0], self.in_features), dtype=torch.float32)
        rows.dequantize_blocks(blocks.numpy(), GGML_KINDS[self.kind][1], out.numpy())
        return out.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > INT_MAX_TOKENS * self.in_features or x.device.type != "cpu" or x.dtype not in _FLOAT_KINDS:
            return self._dequantized_linear(x)
        return _call(self.job, x.contiguous(), self.blocks.shape[0])

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        """torch's GEMM over the weight dequantized DEQUANTIZE_ROWS rows at a time: a resident lm_head of 152k rows
        (Qwen3's vocabulary) would otherwise need its 1.2 GB float32 copy at every prefill that scores every
        position."""
        n = self.blocks.shape[0]
        if n <= DEQUANTIZE_ROWS:
            return F.linear(x, self.dequantized(x.dtype))
        out = x.new_empty((*x.shape[:-1], n))
        for lo in range(0, n, DEQUANTIZE_ROWS):
            hi = min(lo + DEQUANTIZE_ROWS, n)
            out[..., lo:hi] = F.linear(x, self.dequantized(x.dtype, lo, hi))
        return out


@dataclass(frozen=True)
class Mxfp4Linear:
    """MXFP4 as gpt-oss's safetensors hold it (``codes`` uint8 [N, K/2], two inputs a byte, low nibble the even
    one; ``exponents`` uint8 [N, K/32], E8M0), views of a slot, computed with int8 activations per block of 32 as
    llama.cpp computes MXFP4; above INT_MAX_TOKENS dequantized once per call for torch's GEMM."""

    codes: torch.Tensor
    exponents: torch.Tensor
    job: np.ndarray = field(init=False, repr=False, compare=False)  # its kernel job's weight half, made once

    def __post_init__(self) -> None:
        n, half = self.codes.shape
        base = jobs.weight_base(jobs.MXFP4_PLAIN_A8, n, 2 * half, self.codes.data_ptr(), s=self.exponents.data_ptr())
        object.__setattr__(self, "job", base)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in ``dtype``, exactly (every MXFP4 value is a float32)."""
        out = torch.empty((self.codes.shape[0], 2 * self.codes.shape[1]), dtype=torch.float32)
        rows.dequantize_mxfp4(self.codes.numpy(), self.exponents.numpy(), out.numpy())
        return out.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = 2 * self.codes.shape[1]
        if x.numel() > INT_MAX_TOKENS * k or x.device.type != "cpu" or x.dtype not in _FLOAT_KINDS:
            return F.linear(x, self.dequantized(x.dtype))
        return _call(self.job, x.contiguous(), self.codes.shape[0])
