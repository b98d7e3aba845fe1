"""Expert layouts and the expert's forward.

One expert = one contiguous byte buffer (mixtral-offloading's idea: a move is one copy); a layout
says where each of its tensors sits in that buffer and in what format, binds a buffer to an
:class:`Expert` that computes its projections, and converts bytes from another layout into its own
(a cast today; a repack for quantized formats). The cache and the movers only see bytes and
layouts, so a new storage format is a new layout, never a new cache or a branch in the model.

The activation (how the projections combine) is the family's, picked from ``ACTIVATIONS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .registry import lookup

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Part:
    """One tensor inside an expert buffer: byte offset, dtype and shape."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


class Expert(Protocol):
    """An expert bound to its bytes: the projections an activation combines. x: [tokens, hidden]."""

    def gate(self, x: torch.Tensor) -> torch.Tensor: ...

    def up(self, x: torch.Tensor) -> torch.Tensor: ...

    def down(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class DenseExpert:
    """Plain matrices in the compute dtype: gate, up [I, H] and down [H, I]."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_gate)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_up)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_down)


@dataclass(frozen=True)
class ExpertLayout:
    """Where gate [I, H], up [I, H] and down [H, I] sit inside an expert's buffer (dense formats)."""

    gate: Part
    up: Part
    down: Part

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.gate, self.up, self.down)

    @property
    def nbytes(self) -> int:
        """Bytes from the buffer's start to the end of the last part (what a copy must move)."""
        return max(p.offset + p.nbytes for p in self.parts)

    def same_format(self, other: ExpertLayout) -> bool:
        """True when ``other``'s bytes can be used as they are (a raw copy keeps their own offsets)."""
        return type(other) is type(self) and [(p.dtype, p.shape) for p in self.parts] == \
            [(p.dtype, p.shape) for p in other.parts]

    def convert_from(self, src_layout: ExpertLayout, src: torch.Tensor, dest: torch.Tensor) -> None:
        """Fill ``dest`` in this layout from bytes ``src`` in ``src_layout`` (a cast per part)."""
        for have, want in zip(src_layout.parts, self.parts, strict=True):
            want.view(dest).copy_(have.view(src), non_blocking=True)

    def bind(self, buf: torch.Tensor) -> Expert:
        return DenseExpert(self.gate.view(buf), self.up.view(buf), self.down.view(buf))


def packed_layout(hidden: int, intermediate: int, dtype: torch.dtype) -> ExpertLayout:
    """The canonical packing [gate | up | down] in the compute dtype (RAM tier and cast copies)."""
    n = hidden * intermediate * dtype.itemsize
    return ExpertLayout(
        Part(0, dtype, (intermediate, hidden)),
        Part(n, dtype, (intermediate, hidden)),
        Part(2 * n, dtype, (hidden, intermediate)),
    )


# -- activations: how an expert's projections combine ------------------------------------------------

Activation = Callable[[Expert, torch.Tensor], torch.Tensor]


def swiglu(expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020): down(silu(gate x) * up x). x: [tokens, hidden] -> [tokens, hidden]."""
    return expert.down(F.silu(expert.gate(x)) * expert.up(x))


ACTIVATIONS: dict[str, Activation] = {"swiglu": swiglu}


def make_activation(name: str) -> Activation:
    return lookup(ACTIVATIONS, name, "expert activation")
