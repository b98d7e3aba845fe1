"""Expert layouts: where an expert's matrices sit in its one contiguous buffer, and the Expert they compute as.

One expert = one contiguous byte buffer (mixtral-offloading's idea: a move is one copy). A layout
says where each of the expert's matrices (gate, up, down) sits in that buffer and in what format;
it binds a buffer to an :class:`Expert` whose projections compute from those bytes, and converts
bytes from another layout into its own (a cast for dense formats, a repack for quantized ones).
Which layouts a checkpoint's experts are read in, held in RAM in and computed from is their format's
to say (formats/); the cache and the movers only see bytes and layouts, so a new storage format is a
new format and its matrices, never a new cache or a branch in the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from offload.experts.kernels.linear import float_job, float_linear
from offload.spec import ModelSpec

Key = tuple[int, int]  # (layer, expert)
Linear = Callable[[torch.Tensor], torch.Tensor]  # x [tokens, in] -> [tokens, out]


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

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset : self.end].view(self.dtype).view(self.shape)

    def at(self, offset: int) -> Part:
        return Part(offset, self.dtype, self.shape)


@dataclass(frozen=True)
class DenseLinear:
    """A plain weight (and optional bias) in the compute dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    job: np.ndarray | None = field(init=False, repr=False, compare=False)  # the fused layer call's (no bias only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "job", float_job(self.weight) if self.bias is None else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return float_linear(x, self.weight, self.bias)  # offload's GEMV at decode on the CPU, else F.linear


@dataclass(frozen=True)
class Expert:
    """An expert's three projections, whatever their format (resident MLPs and shared experts too)."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    gate_up_proj: Linear | None = None  # gate and up as one [2I, H] matrix where a slot holds them back to back

    @classmethod
    def dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> Expert:
        return cls(DenseLinear(gate), DenseLinear(up), DenseLinear(down))

    @functools.cached_property
    def jobs(self) -> np.ndarray | None:
        """The weight halves of the kernel jobs of gate, up and down, [3, jobs.FIELDS] (a fused layer call's table,
        kernels/moe.py), or None when a projection has no kernel or adds a bias."""
        halves = [getattr(p, "job", None) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        return None if any(h is None for h in halves) else np.stack(halves)

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate x and up x [tokens, I] each: one kernel call over both matrices' rows when they are stacked (one
        hand-off to the pool and one activation quantization instead of two; every row's sum is the same)."""
        if self.gate_up_proj is None:
            return self.gate_proj(x), self.up_proj(x)
        both = self.gate_up_proj(x)
        half = both.shape[-1] // 2
        return both[..., :half], both[..., half:]


class Matrix(Protocol):
    """One projection's tensors inside an expert buffer, in one format."""

    parts: tuple[Part, ...]

    def signature(self) -> tuple: ...  # equal signatures: the same format, so bytes can be used as they are

    def bind(self, buf: torch.Tensor) -> Linear: ...

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class DenseMatrix:
    """A plain [out, in] weight in some float dtype, and optionally a bias [out] (gpt-oss's experts)."""

    w: Part
    b: Part | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.w,) if self.b is None else (self.w, self.b)

    def signature(self) -> tuple:
        return ("dense", self.w.dtype, self.w.shape, self.b is not None)

    def bind(self, buf: torch.Tensor) -> Linear:
        return DenseLinear(self.w.view(buf), None if self.b is None else self.b.view(buf))

    def stacked(self, below: Matrix, buf: torch.Tensor) -> Linear | None:
        """This weight and ``below`` as one [2 x out, in] linear when ``below`` starts where this one ends."""
        if isinstance(below, DenseMatrix) and stacks(self.w, below.w) and self.b is None and below.b is None:
            return DenseLinear(Part(self.w.offset, self.w.dtype, (2 * self.w.shape[0], *self.w.shape[1:])).view(buf))
        return None

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        weight, bias = src.dense(src_buf) if hasattr(src, "dense") else (None, None)
        if weight is None:
            raise TypeError(f"a dense slot cannot hold {type(src).__name__} bytes")
        self.w.view(buf).copy_(weight, non_blocking=True)  # a cast when the dtypes differ
        if self.b is not None:
            self.b.view(buf).copy_(bias)

    def dense(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight [out, in] and bias as views of ``buf``."""
        return self.w.view(buf), None if self.b is None else self.b.view(buf)


@dataclass(frozen=True)
class FusedColumns:
    """gpt-oss as transformers saves it: one expert's gate_up [in, 2 * out] (in, out orientation) with gate
    and up interleaved in its columns, and gate_up's bias [2 * out]; ``parity`` 0 is gate, 1 is up."""

    w: Part
    b: Part
    parity: int

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.w, self.b)

    def signature(self) -> tuple:
        return ("fused-columns", self.w.dtype, self.w.shape, self.parity)

    def dense(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w.view(buf)[:, self.parity :: 2].t(), self.b.view(buf)[self.parity :: 2]

    def bind(self, buf: torch.Tensor) -> Linear:
        return DenseLinear(*self.dense(buf))

    def convert_from(self, src: Matrix, src_buf: torch.Tensor, buf: torch.Tensor) -> None:
        raise TypeError("a checkpoint format is read, never written into")


@dataclass(frozen=True)
class InOutMatrix:
    """A weight stored [in, out] (gpt-oss's down_proj) and its bias [out]."""

    w: Part
    b: Part

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.w, self.b)

    def signature(self) -> tuple:
        return ("in-out", self.w.dtype, self.w.shape)

    def dense(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w.view(buf).t(), self.b.view(buf)

    bind = FusedColumns.bind
    convert_from = FusedColumns.convert_from


@dataclass(frozen=True)
class ExpertLayout:
    """Where gate [I, H], up [I, H] and down [H, I] sit inside an expert's buffer, each in its format."""

    gate: Matrix
    up: Matrix
    down: Matrix

    @property
    def matrices(self) -> tuple[Matrix, Matrix, Matrix]:
        return (self.gate, self.up, self.down)

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(p for m in self.matrices for p in m.parts)

    @property
    def nbytes(self) -> int:
        """Bytes from the buffer's start to the end of the last part (what a copy must move)."""
        return max(p.end for p in self.parts)

    def same_format(self, other: ExpertLayout) -> bool:
        """True when ``other``'s bytes can be used as they are (a raw copy keeps their own offsets)."""
        return [m.signature() for m in self.matrices] == [m.signature() for m in other.matrices]

    def holds(self, other: ExpertLayout) -> bool:
        """Whether a slot in this layout takes ``other``'s bytes as they are (a copy, or a read straight in)."""
        return self.same_format(other)

    def convert_from(self, src_layout: ExpertLayout, src: torch.Tensor, dest: torch.Tensor) -> None:
        """Fill ``dest`` in this layout from bytes ``src`` in ``src_layout``, matrix by matrix."""
        for have, want in zip(src_layout.matrices, self.matrices, strict=True):
            want.convert_from(have, src, dest)

    def over(self, other: ExpertLayout, tail: int) -> ExpertLayout | None:
        """This layout laid over ``other``'s bytes where its matrices compute from them as they are (int4 codes as
        compressed-tensors packs them), with what they derive (float32 scales, mins) from ``tail`` on; None when a
        matrix cannot. A slot in it is filled by reading ``other``'s bytes straight in and converting only the rest
        in place (``convert_from(other, slot, slot)``), so a disk miss stays one read and copies no codes."""
        placed = []
        for have, want in zip(other.matrices, self.matrices, strict=True):
            over = getattr(want, "over", None)
            laid = over(have, tail) if over is not None else None
            if laid is None:
                return None
            placed.append(laid)
            tail = max(p.end for p in laid.parts)
        return ExpertLayout(*placed)

    def bind(self, buf: torch.Tensor) -> Expert:
        stacked = getattr(self.gate, "stacked", None)  # a format whose gate and up can run as one matrix
        return Expert(*(m.bind(buf) for m in self.matrices), stacked(self.up, buf) if stacked else None)


@dataclass(frozen=True)
class SlotUnion:
    """A slot that holds any of several layouts as they are, sized for the largest: a GGUF file whose layers differ
    in ggml type (Q4_K_M's down projections are Q6_K in some layers, Q4_K in others) computes each layer from its
    own blocks. Bytes arrive in their layer's layout and are bound by it, so nothing is ever converted into this."""

    layouts: tuple[ExpertLayout, ...]

    @property
    def nbytes(self) -> int:
        return max(layout.nbytes for layout in self.layouts)

    def holds(self, other: ExpertLayout) -> bool:
        return any(layout.same_format(other) for layout in self.layouts)

    def convert_from(self, src_layout: ExpertLayout, src: torch.Tensor, dest: torch.Tensor) -> None:
        raise TypeError(f"a slot for {len(self.layouts)} layer layouts holds them as they are and converts nothing "
                        "into itself")

    def over(self, other: ExpertLayout, tail: int) -> None:
        """Nothing to lay over: it holds its layouts' bytes as they are."""
        return None


SlotLayout = ExpertLayout | SlotUnion  # what a cache slot is laid out as


def stacks(top: Part, below: Part) -> bool:
    """Whether two parts of one dtype and shape lie back to back, ``below`` right after ``top``."""
    return below.offset == top.end and below.dtype == top.dtype and below.shape == top.shape


def pack_matrices(matrices: Sequence[Matrix], align: int = 64) -> ExpertLayout:
    """The same matrices with their parts back to back (each ``align``-aligned) in one buffer: the
    layout of a cache slot and of the RAM tier for formats whose parts differ in size."""
    placed, offset = [], 0
    for m in matrices:
        moved = {}
        for f in dataclasses.fields(m):  # type: ignore[arg-type]
            part = getattr(m, f.name)
            if isinstance(part, Part):
                offset = -(-offset // align) * align
                moved[f.name] = part.at(offset)
                offset += part.nbytes
        placed.append(dataclasses.replace(m, **moved))  # type: ignore[type-var]
    return ExpertLayout(*placed)


def packed_layout(hidden: int, intermediate: int, dtype: torch.dtype) -> ExpertLayout:
    """The canonical packing [gate | up | down] in a float dtype (RAM tier and cast copies)."""
    n = hidden * intermediate * dtype.itemsize
    return ExpertLayout(
        DenseMatrix(Part(0, dtype, (intermediate, hidden))),
        DenseMatrix(Part(n, dtype, (intermediate, hidden))),
        DenseMatrix(Part(2 * n, dtype, (hidden, intermediate))),
    )


def projection_shapes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(out, in) of gate, up and down."""
    h, i = spec.hidden_size, spec.expert_intermediate_size
    return ((i, h), (i, h), (h, i))
