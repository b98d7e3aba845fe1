"""Counters and timings that every layer reports into, exported as a dict (and JSON by the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerStats:
    """Expert-cache accounting for one MoE layer (or the total over layers)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_time_s: float = 0.0     # time spent moving expert bytes into slots (host-side wall time)
    compute_time_s: float = 0.0  # time spent in expert matmuls

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return {**asdict(self), "accesses": self.accesses, "hit_rate": round(self.hit_rate, 6)}


@dataclass
class Stats:
    """Everything a run measured: per-layer cache counts plus generation totals."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0

    def layer(self, index: int) -> LayerStats:
        if index not in self.layers:
            self.layers[index] = LayerStats()
        return self.layers[index]

    @property
    def total(self) -> LayerStats:
        total = LayerStats()
        for s in self.layers.values():
            total.add(s)
        return total

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_time_s if self.decode_time_s else 0.0

    def reset(self) -> None:
        self.layers.clear()
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_time_s = self.decode_time_s = 0.0

    def to_dict(self) -> dict:
        return {
            "total": self.total.to_dict(),
            "layers": {str(i): s.to_dict() for i, s in sorted(self.layers.items())},
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "prefill_time_s": round(self.prefill_time_s, 6),
            "decode_time_s": round(self.decode_time_s, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }

    def summary(self) -> str:
        t = self.total
        return (
            f"experts: {t.hits} hits, {t.misses} misses ({t.hit_rate:.1%} hit rate), {t.evictions} evictions, "
            f"{t.bytes_loaded / 2**20:.1f} MiB loaded in {t.load_time_s:.2f}s; "
            f"decode {self.decode_tokens} tokens at {self.decode_tokens_per_s:.2f} tokens/s"
        )
