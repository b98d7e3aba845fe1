"""kernels/dense.py's RMSNorm against tests/reference.py's float64 one and against torch's ops (model/attention.py).

Tolerances: the loop sums squares in float32 in another order than torch (1e-7 relative per term), so in float32 it
agrees with torch within 1e-6 relative of the output scale; in bf16 both round the same float32 value twice (after
the normalisation and after the weight), so they differ by at most one bf16 unit (2^-8 relative) where a last float32
bit tips a rounding, and nowhere else. Against float64, each dtype's rounding: 1e-6 (float32), 2^-7 (two bf16
roundings).
"""

from __future__ import annotations

import pytest
import torch

from offload.experts.kernels import dense
from offload.model import attention
from tests import reference as R


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 64), (16, 100), (2, 1, 7)])
def test_rms_norm_equals_the_reference(dtype, shape):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 3).to(dtype)
    weight = torch.randn(shape[-1]).to(dtype)
    assert dense.rms_norm_runs(x, weight)
    out = dense.rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    scale = float(out.float().abs().max())
    expected = R.ref_rms_norm(x, weight, 1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
    ours, theirs = out.float(), _torch_rms_norm(x, weight, 1e-6).float()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * scale)
    else:
        differ = ours != theirs  # one bf16 unit where a float32 last bit tipped a rounding
        assert ((ours - theirs).abs()[differ] <= theirs.abs()[differ] * 2.0**-7).all()
        assert differ.float().mean() < 0.05


def test_nan_and_inf_rows_stay_non_finite():
    x = torch.randn(3, 32)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    out = dense.rms_norm(x, torch.ones(32), 1e-6)
    assert not torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()


@pytest.mark.parametrize("case", ["prefill", "float16", "mixed", "strided"])
def test_other_calls_keep_torch_s_ops(case):
    x, weight = torch.randn(2, 64), torch.randn(64)
    if case == "prefill":
        x = torch.randn(dense.MAX_ROWS + 1, 64)
    elif case == "float16":
        x, weight = x.half(), weight.half()
    elif case == "mixed":
        weight = weight.bfloat16()
    else:
        x = torch.randn(64, 2).t()
    assert not dense.rms_norm_runs(x, weight)
    assert torch.equal(attention.rms_norm(x, weight, 1e-5), _torch_rms_norm(x, weight, 1e-5))


def _torch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    out = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return torch.cat((out, rest), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, tokens, dim", [(1, 1, 64), (3, 1, 64), (2, 5, 32), (1, 16, 16)])
def test_rope_is_torch_s_bit_for_bit(dtype, batch, tokens, dim):
    """Each product and the sum round to the compute dtype where torch's ops round: equal, not close. The query
    is a transposed view, as attention hands it over; dims past ``dim`` (partial rotary) pass through."""
    torch.manual_seed(batch * 100 + tokens)
    x = (torch.randn(batch, tokens, 4, 64) * 4).to(dtype).transpose(1, 2)   # [b, heads, t, head_dim], strided
    angles = torch.randn(batch, 1, tokens, dim // 2) * 3
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(dtype) for f in (torch.cos, torch.sin))
    assert dense.rope_runs(x, cos, sin)
    assert torch.equal(dense.rope(x, cos, sin), _torch_rope(x, cos, sin))
    shared = (cos[:1], sin[:1])                                             # one table for every row
    assert torch.equal(dense.rope(x, *shared), _torch_rope(x, *shared))


def test_prefill_and_other_dtypes_keep_torch_s_rope():
    from offload.model.rope import apply_rope

    x = torch.randn(1, 2, dense.MAX_ROWS + 1, 8)
    cos, sin = torch.randn(1, 1, dense.MAX_ROWS + 1, 8), torch.randn(1, 1, dense.MAX_ROWS + 1, 8)
    assert not dense.rope_runs(x, cos, sin) and not dense.rope_runs(x[:, :, :2].half(), cos[:, :, :2].half(),
                                                                    sin[:, :, :2].half())
    assert torch.equal(apply_rope(x, cos, sin), _torch_rope(x, cos, sin))
