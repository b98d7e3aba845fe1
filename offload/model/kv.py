"""Key/value caches: one length for a left-padded batch (KVCache), or one length per row (KVPool).

Both store [rows, heads, capacity, dim] "k" and "v" tensors per layer, preallocated once, in the
shapes the layer's attention asks for (per-head keys and values for GQA; MLA's latent and shared
rotary key), and expose the same small interface to attention: ``update`` (store this step's, return
all so far), ``storage_positions`` (where this step's queries sit), ``fresh`` and ``slots`` for the
prefetcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offload.spec import ModelSpec

LayerShapes = tuple[tuple[int, int], tuple[int, int]]  # ((k heads, k dim), (v heads, v dim)) of one layer


def _buffers(spec: ModelSpec, shapes: Sequence[LayerShapes] | None, rows: int, capacity: int,
             dtype: torch.dtype, device: torch.device, alloc) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shapes = shapes or [((spec.num_kv_heads, spec.head_dim),) * 2] * spec.num_layers
    k = [alloc((rows, kh, capacity, kd), dtype=dtype, device=device) for (kh, kd), _ in shapes]
    v = [alloc((rows, vh, capacity, vd), dtype=dtype, device=device) for _, (vh, vd) in shapes]
    return k, v


def bytes_per_token(k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> int:
    """What one token of one row costs in the cache, over all layers."""
    return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (*k, *v))


class KVCache:
    """Preallocated keys and values for every layer: [batch, kv_heads, capacity, head_dim].

    All rows share one length (a left-padded batch); KVPool below gives each row its own.
    """

    def __init__(self, spec: ModelSpec, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 shapes: Sequence[LayerShapes] | None = None) -> None:
        self.k, self.v = _buffers(spec, shapes, batch, capacity, dtype, device, torch.empty)
        self.length = 0  # tokens already stored

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.k, self.v)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def fresh(self) -> torch.Tensor:
        """[batch] bool: rows whose sequence starts with this step."""
        return torch.full((self.k[0].shape[0],), self.length == 0)

    def slots(self) -> torch.Tensor:
        """Identity of each batch row across steps (the prefetcher keys per-sequence history by it)."""
        return torch.arange(self.k[0].shape[0])

    def valid(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """[batch, seq] bool: this step's tokens that are real (left padding is not)."""
        return attention_mask[:, -seq:].bool()

    def storage_positions(self, seq: int) -> torch.Tensor:
        """[1, seq] index in storage of this step's tokens (the same for every row)."""
        return torch.arange(self.length, self.length + seq, device=self.k[0].device)[None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, seq: int) -> None:
        self.length += seq


class KVPool:
    """Keys and values of many sequences, one row each with its own length (continuous batching).

    A step runs over a subset of rows (``select``); each row's tokens are stored from its own
    length on, so requests that joined at different times decode in one batch without padding.
    """

    def __init__(self, spec: ModelSpec, rows: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 shapes: Sequence[LayerShapes] | None = None) -> None:
        # Zeros, not empty: a short row attends over the batch's longest key range, and its masked
        # keys must hold finite numbers (uninitialised memory can hold NaN, and NaN * 0 is NaN).
        self.k, self.v = _buffers(spec, shapes, rows, capacity, dtype, device, torch.zeros)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows = torch.arange(0)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.k, self.v)

    def select(self, rows: torch.Tensor) -> None:
        """The next forward step runs over these rows (in this order)."""
        self.rows = rows.to(self.lengths.device)

    def fresh(self) -> torch.Tensor:
        return self.lengths[self.rows] == 0

    def reset(self, row: int) -> None:
        """Row ``row`` starts a new sequence."""
        self.lengths[row] = 0

    def slots(self) -> torch.Tensor:
        return self.rows

    def valid(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """[rows, seq] bool: every token of a pooled step is real (rows are never padded)."""
        return torch.ones((len(self.rows), seq), dtype=torch.bool, device=self.lengths.device)

    def storage_positions(self, seq: int) -> torch.Tensor:
        """[rows, seq] index in storage of this step's tokens: each row continues at its own length."""
        return self.lengths[self.rows][:, None] + torch.arange(seq, device=self.lengths.device)

    def attention_mask(self, seq: int) -> torch.Tensor:
        """[rows, total]: a row sees its own stored tokens and this step's."""
        ends = self.lengths[self.rows] + seq
        return (torch.arange(int(ends.max()), device=ends.device)[None] < ends[:, None]).long()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [rows, kv_heads, seq, head_dim] -> stored at each row's positions
        pos = self.storage_positions(k.shape[2])                      # [rows, seq]
        rows = self.rows[:, None].expand_as(pos)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)                # indexed view: [rows, seq, heads, dim]
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = int(pos.max()) + 1
        return self.k[layer][self.rows, :, :end], self.v[layer][self.rows, :, :end]

    def advance(self, seq: int) -> None:
        self.lengths[self.rows] += seq
