"""offload/experts/layouts.py: parts view the right bytes, layouts convert between formats, the SwiGLU forward
equals its formula, and every bound expert computes what plain matrices compute."""

from __future__ import annotations

import pytest
import torch

from offload.errors import ConfigError
from offload.experts.activations import make_activation, swiglu
from offload.experts.layouts import DenseMatrix, Expert, ExpertLayout, Part, pack_matrices, packed_layout

H, I = 8, 12


def test_packed_layout_places_gate_up_down_back_to_back():
    layout = packed_layout(H, I, torch.bfloat16)
    n = H * I * 2
    assert [p.offset for p in layout.parts] == [0, n, 2 * n] and layout.nbytes == 3 * n
    assert layout.down.w.shape == (H, I) and layout.gate.w.nbytes == n


def test_bind_views_the_buffer_without_copying():
    layout = packed_layout(H, I, torch.float32)
    buf = torch.arange(layout.nbytes // 4, dtype=torch.float32).view(torch.uint8)
    expert = layout.bind(buf)
    assert expert.up_proj.weight.data_ptr() == buf.data_ptr() + layout.up.w.offset
    assert float(expert.up_proj.weight[0, 0]) == H * I  # the first float of the second matrix


def test_convert_from_casts_every_part_into_the_slot_layout():
    # a disk layout: gaps between the tensors
    src_layout = ExpertLayout(DenseMatrix(Part(64, torch.float32, (I, H))),
                              DenseMatrix(Part(1024, torch.float32, (I, H))),
                              DenseMatrix(Part(4096, torch.float32, (H, I))))
    src = torch.zeros(src_layout.nbytes, dtype=torch.uint8)
    weights = [torch.randn(p.shape) for p in src_layout.parts]
    for part, w in zip(src_layout.parts, weights, strict=True):
        part.view(src).copy_(w)
    slot = packed_layout(H, I, torch.bfloat16)
    assert not slot.same_format(src_layout) and src_layout.same_format(packed_layout(H, I, torch.float32))
    dest = torch.empty(slot.nbytes, dtype=torch.uint8)
    slot.convert_from(src_layout, src, dest)
    for part, w in zip(slot.parts, weights, strict=True):
        assert torch.equal(part.view(dest), w.to(torch.bfloat16))


def test_swiglu_is_down_of_silu_gate_times_up():
    g, u, d, x = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I), torch.randn(5, H)
    expected = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(swiglu(Expert.dense(g, u, d), x), expected)
    assert make_activation("SwiGLU") is swiglu
    with pytest.raises(ConfigError, match="unknown expert activation 'gelu'"):
        make_activation("gelu")


def test_pack_matrices_aligns_each_part_and_keeps_the_formats():
    odd = [DenseMatrix(Part(7, torch.float32, (3, 5))), DenseMatrix(Part(999, torch.float16, (5, 3))),
           DenseMatrix(Part(0, torch.float32, (2, 2)))]
    layout = pack_matrices(odd)
    assert [p.offset for p in layout.parts] == [0, 64, 128] and layout.nbytes == 128 + 16
    assert [m.signature() for m in layout.matrices] == [m.signature() for m in odd]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_packed_slot_runs_gate_and_up_as_one_stacked_matrix(dtype):
    """Gate and up back to back in a slot are one [2I, H] call; each half equals its own matrix's call exactly
    (every output row is the same sum, on the kernels' decode path and on torch's GEMM above it)."""
    layout = packed_layout(H, I, dtype)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for part in layout.parts:
        part.view(buf).copy_(torch.randn(part.shape))
    expert = layout.bind(buf)
    assert expert.gate_up_proj is not None
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, H).to(dtype)
        gate, up = expert.gate_and_up(x)
        assert torch.equal(gate, expert.gate_proj(x)) and torch.equal(up, expert.up_proj(x)), tokens
    # gate and up apart (a checkpoint's own layout): two calls
    apart = ExpertLayout(DenseMatrix(Part(0, dtype, (I, H))), DenseMatrix(Part(4096, dtype, (I, H))),
                         DenseMatrix(Part(8192, dtype, (H, I))))
    assert apart.bind(torch.zeros(apart.nbytes, dtype=torch.uint8)).gate_up_proj is None
