"""One expert = one contiguous byte buffer; its three matrices are views into it, so a move is one copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Part:
    """One matrix inside an expert buffer: byte offset, dtype and shape."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * self.shape[0] * self.shape[1]

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class ExpertLayout:
    """Where gate [I, H], up [I, H] and down [H, I] sit inside an expert's buffer."""

    gate: Part
    up: Part
    down: Part

    @property
    def parts(self) -> tuple[Part, Part, Part]:
        return (self.gate, self.up, self.down)

    @property
    def dtype(self) -> torch.dtype:
        return self.gate.dtype

    @property
    def nbytes(self) -> int:
        """Bytes from the buffer's start to the end of the last part (what a copy must move)."""
        return max(p.offset + p.nbytes for p in self.parts)

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate.view(buf), self.up.view(buf), self.down.view(buf)


def packed_layout(hidden: int, intermediate: int, dtype: torch.dtype) -> ExpertLayout:
    """The canonical packing [gate | up | down] in the compute dtype (RAM tier and cast copies)."""
    n = hidden * intermediate * dtype.itemsize
    return ExpertLayout(
        Part(0, dtype, (intermediate, hidden)),
        Part(n, dtype, (intermediate, hidden)),
        Part(2 * n, dtype, (hidden, intermediate)),
    )


def expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: down(silu(gate x) * up x). x: [tokens, hidden] -> [tokens, hidden]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
