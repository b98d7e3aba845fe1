"""What a sequence keeps between steps: one length for a left-padded batch (KVCache), or one length per row
(KVPool).

Each layer says what it keeps (a :class:`LayerStore`, from its attention piece): keys and values per token,
[rows, heads, capacity, dim] preallocated once in the shapes the attention asks for (per-head keys and values
for GQA; MLA's latent and shared rotary key), and/or a fixed-size state per sequence (Gated DeltaNet's conv
inputs and recurrent state), whose size does not grow with the context. Both structures expose the same small
interface to attention: ``update`` (store this step's keys and values, return all so far), ``state`` /
``set_state`` (a layer's state for this step's rows), ``storage_positions`` (where this step's queries sit),
``fresh`` and ``slots`` for the prefetcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from offload.spec import ModelSpec

LayerShapes = tuple[tuple[int, int], tuple[int, int]]  # ((k heads, k dim), (v heads, v dim)) of one layer
StateShape = tuple[tuple[int, ...], torch.dtype | None]  # a per-sequence tensor: its shape, dtype (None: compute)


@dataclass(frozen=True)
class LayerStore:
    """What one layer keeps per sequence: keys and values per token, and/or tensors of a fixed size."""

    kv: LayerShapes | None = None
    state: tuple[StateShape, ...] = ()

    def state_nbytes(self, dtype: torch.dtype) -> int:
        """One sequence's state bytes (constant in the context)."""
        total = 0
        for shape, own in self.state:
            n = (own or dtype).itemsize
            for d in shape:
                n *= d
            total += n
        return total

    def token_nbytes(self, dtype: torch.dtype) -> int:
        """One token's keys and values."""
        return 0 if self.kv is None else sum(h * d for h, d in self.kv) * dtype.itemsize


def gqa_stores(spec: ModelSpec) -> list[LayerStore]:
    """Per-head keys and values in every layer (what GQA keeps; the default for hand-made caches)."""
    return [LayerStore(((spec.num_kv_heads, spec.head_dim),) * 2)] * spec.num_layers


class _Storage:
    """Every layer's buffers for ``rows`` sequences: keys / values ([rows, heads, capacity, dim], None for a layer
    that keeps none) and states ([rows, *shape], zeros: a new sequence's state)."""

    def __init__(self, stores: Sequence[LayerStore], rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, alloc) -> None:
        def buffer(store: LayerStore, which: int) -> torch.Tensor | None:
            if store.kv is None:
                return None
            heads, dim = store.kv[which]
            return alloc((rows, heads, capacity, dim), dtype=dtype, device=device)

        self.k, self.v = [buffer(s, 0) for s in stores], [buffer(s, 1) for s in stores]
        self.states = [[torch.zeros((rows, *shape), dtype=own or dtype, device=device) for shape, own in s.state]
                       for s in stores]
        self.capacity, self.rows = capacity, rows
        self.token_nbytes = sum(s.token_nbytes(dtype) for s in stores)
        self.state_nbytes = sum(s.state_nbytes(dtype) for s in stores)


class KVCache(_Storage):
    """Preallocated keys and values for every layer: [batch, kv_heads, capacity, head_dim], and per-sequence states.

    All rows share one length (a left-padded batch); KVPool below gives each row its own.
    """

    def __init__(self, spec: ModelSpec, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 stores: Sequence[LayerStore] | None = None) -> None:
        super().__init__(stores or gqa_stores(spec), batch, capacity, dtype, device, torch.empty)
        self.device = device
        self.length = 0  # tokens already stored

    @property
    def bytes_per_token(self) -> int:
        """What one token of one row costs in the cache, over all layers."""
        return self.token_nbytes

    def fresh(self) -> torch.Tensor:
        """[batch] bool: rows whose sequence starts with this step."""
        return torch.full((self.rows,), self.length == 0)

    def slots(self) -> torch.Tensor:
        """Identity of each batch row across steps (the prefetcher keys per-sequence history by it)."""
        return torch.arange(self.rows)

    def valid(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """[batch, seq] bool: this step's tokens that are real (left padding is not)."""
        return attention_mask[:, -seq:].bool()

    def storage_positions(self, seq: int) -> torch.Tensor:
        """[1, seq] index in storage of this step's tokens (the same for every row)."""
        return torch.arange(self.length, self.length + seq, device=self.device)[None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def state(self, layer: int) -> list[torch.Tensor]:
        """Layer ``layer``'s state tensors for every row."""
        return self.states[layer]

    def set_state(self, layer: int, *tensors: torch.Tensor) -> None:
        for have, new in zip(self.states[layer], tensors, strict=True):
            have.copy_(new)

    def advance(self, seq: int) -> None:
        self.length += seq


class KVPool(_Storage):
    """Keys, values and states of many sequences, one row each with its own length (continuous batching).

    A step runs over a subset of rows (``select``); each row's tokens are stored from its own
    length on, so requests that joined at different times decode in one batch without padding.
    """

    def __init__(self, spec: ModelSpec, rows: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 stores: Sequence[LayerStore] | None = None) -> None:
        # Zeros, not empty: a short row attends over the batch's longest key range, and its masked
        # keys must hold finite numbers (uninitialised memory can hold NaN, and NaN * 0 is NaN).
        super().__init__(stores or gqa_stores(spec), rows, capacity, dtype, device, torch.zeros)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.selected = torch.arange(0)

    @property
    def bytes_per_token(self) -> int:
        return self.token_nbytes

    def select(self, rows: torch.Tensor) -> None:
        """The next forward step runs over these rows (in this order)."""
        self.selected = rows.to(self.lengths.device)

    def fresh(self) -> torch.Tensor:
        return self.lengths[self.selected] == 0

    def reset(self, row: int) -> None:
        """Row ``row`` starts a new sequence: no tokens, and the zero state a new sequence starts from (a cancelled
        or finished request's state must not leak into the next one)."""
        self.lengths[row] = 0
        for layer in self.states:
            for t in layer:
                t[row].zero_()

    def slots(self) -> torch.Tensor:
        return self.selected

    def valid(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """[rows, seq] bool: every token of a pooled step is real (rows are never padded)."""
        return torch.ones((len(self.selected), seq), dtype=torch.bool, device=self.lengths.device)

    def storage_positions(self, seq: int) -> torch.Tensor:
        """[rows, seq] index in storage of this step's tokens: each row continues at its own length."""
        return self.lengths[self.selected][:, None] + torch.arange(seq, device=self.lengths.device)

    def attention_mask(self, seq: int) -> torch.Tensor:
        """[rows, total]: a row sees its own stored tokens and this step's."""
        ends = self.lengths[self.selected] + seq
        return (torch.arange(int(ends.max()), device=ends.device)[None] < ends[:, None]).long()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [rows, kv_heads, seq, head_dim] -> stored at each row's positions
        pos = self.storage_positions(k.shape[2])                      # [rows, seq]
        rows = self.selected[:, None].expand_as(pos)
        self.k[layer][rows, :, pos] = k.transpose(1, 2)                # indexed view: [rows, seq, heads, dim]
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        end = int(pos.max()) + 1
        return self.k[layer][self.selected, :, :end], self.v[layer][self.selected, :, :end]

    def state(self, layer: int) -> list[torch.Tensor]:
        """Layer ``layer``'s state tensors of the selected rows (gathered: [selected, *shape])."""
        return [t[self.selected] for t in self.states[layer]]

    def set_state(self, layer: int, *tensors: torch.Tensor) -> None:
        for have, new in zip(self.states[layer], tensors, strict=True):
            have[self.selected] = new

    def advance(self, seq: int) -> None:
        self.lengths[self.selected] += seq
