"""Counters and timings that every layer reports into, exported as a dict (and JSON by the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

CHOICES = ("fetch", "cpu")  # what the hybrid cost model picks for a miss


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0.0 for an empty denominator (a rate over no events)."""
    return numerator / denominator if denominator else 0.0


class HitRate:
    """Accesses and hit rate of anything that counts ``hits`` and ``misses`` (the runtime cache, the simulator)."""

    hits: int
    misses: int

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return ratio(self.hits, self.accesses)


@dataclass
class LayerStats(HitRate):
    """Expert-cache accounting for one MoE layer (or the total over layers)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_time_s: float = 0.0     # time spent moving expert bytes into slots (host-side wall time)
    compute_time_s: float = 0.0  # time spent in expert matmuls
    stalls: int = 0              # demand accesses whose bytes were not there yet (misses and late prefetches)
    stall_time_s: float = 0.0    # time the compute thread waited for them
    prefetch_issued: int = 0     # loads started ahead of use by the prefetcher
    prefetch_used: int = 0       # ... demanded while still resident
    prefetch_wasted: int = 0     # ... not used by the layer they were fetched for
    steps: int = 0               # forward steps through this layer's MoE block
    distinct_experts: int = 0    # sum over steps of the distinct experts a step needed (its batch's union)
    warm_loads: int = 0          # experts a task pattern loaded at a request's start (warm start, --patterns)
    warm_hits: int = 0           # ... demanded while still resident: misses the warm start turned into hits
    pruned_tokens: int = 0       # tokens routed among a pruned set of experts (--prune) ...
    pruned_mass: float = 0.0     # ... and the sum of their unrestricted routing weight that fell on dropped experts

    @property
    def distinct_per_step(self) -> float:
        return ratio(self.distinct_experts, self.steps)

    @property
    def pruned_share(self) -> float:
        """Mean share of a token's routing weight that pruning dropped at this layer."""
        return ratio(self.pruned_mass, self.pruned_tokens)

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return {**asdict(self), "accesses": self.accesses, "hit_rate": round(self.hit_rate, 6),
                "distinct_per_step": round(self.distinct_per_step, 6), "pruned_share": round(self.pruned_share, 6)}


@dataclass
class PredictionStats:
    """How well the predictor named the experts of the layer ``lookahead`` steps ahead, per step.

    For each (step, layer) the predicted set is the union of every token's candidates and the
    actual set the union of experts the layer then used: precision = correct / predicted,
    recall = correct / actual.
    """

    predicted: int = 0
    actual: int = 0
    correct: int = 0

    @property
    def precision(self) -> float:
        return ratio(self.correct, self.predicted)

    @property
    def recall(self) -> float:
        return ratio(self.correct, self.actual)

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": round(self.precision, 6), "recall": round(self.recall, 6)}


@dataclass
class HybridStats:
    """What the per-miss choice did (mutable counters, like stats.LayerStats; exported with to_dict)."""

    cpu_experts: int = 0       # missed experts computed on the CPU from their host copy
    cpu_tokens: int = 0        # (token, expert) pairs those computed
    fetched: int = 0           # misses fetched into the device cache
    bytes_not_moved: int = 0   # slot bytes the CPU computes kept off the bus
    cpu_time_s: float = 0.0    # wall time of the CPU branch (compute and the hidden states' round trip)

    def record(self, choice: str, slot_nbytes: int, tokens: int, seconds: float = 0.0) -> None:
        """Count one miss's choice (``seconds``: the CPU branch's time, when it ran)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if choice == "fetch":
            self.fetched += 1
            return
        self.cpu_experts += 1
        self.cpu_tokens += tokens
        self.bytes_not_moved += slot_nbytes
        self.cpu_time_s += seconds

    def add(self, other: HybridStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskStats:
    """Which task pattern each request matched (--patterns): counts by task and the latest match."""

    matches: dict[str, int] = field(default_factory=dict)
    last: str = ""              # the latest request's task ("" before any)
    confidence: float = 0.0     # ... and its confidence
    pruned_to: str = ""         # the task whose experts --prune keeps ("" without pruning)

    def record(self, task: str, confidence: float) -> None:
        self.matches[task] = self.matches.get(task, 0) + 1
        self.last, self.confidence = task, confidence

    def to_dict(self) -> dict:
        return {**asdict(self), "confidence": round(self.confidence, 6)}


@dataclass
class Stats:
    """Everything a run measured: per-layer cache counts plus generation totals."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    predictor_time_s: float = 0.0  # asking the predictor and issuing prefetches (waits on loads excluded)
    prediction: dict[int, PredictionStats] = field(default_factory=dict)  # by lookahead
    hybrid: HybridStats = field(default_factory=HybridStats)  # the per-miss CPU/fetch choice (--hybrid)
    task: TaskStats = field(default_factory=TaskStats)  # task patterns: matches and pruning (--patterns)

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
        return ratio(self.decode_tokens, self.decode_time_s)

    def reset(self) -> None:
        self.layers.clear()
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_time_s = self.decode_time_s = self.predictor_time_s = 0.0
        self.prediction.clear()
        self.hybrid = HybridStats()
        self.task = TaskStats(pruned_to=self.task.pruned_to)  # pruning lasts as long as the model

    def to_dict(self) -> dict:
        return {
            "total": self.total.to_dict(),
            "layers": {str(i): s.to_dict() for i, s in sorted(self.layers.items())},
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "prefill_time_s": round(self.prefill_time_s, 6),
            "decode_time_s": round(self.decode_time_s, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "predictor_time_s": round(self.predictor_time_s, 6),
            "prediction": {str(d): p.to_dict() for d, p in sorted(self.prediction.items())},
            "hybrid": self.hybrid.to_dict(),
            "task": self.task.to_dict(),
        }

    def summary(self) -> str:
        t = self.total
        return (
            f"experts: {t.hits} hits, {t.misses} misses ({t.hit_rate:.1%} hit rate), {t.evictions} evictions, "
            f"{t.bytes_loaded / 2**20:.1f} MiB loaded in {t.load_time_s:.2f}s, "
            f"{t.stalls} stalls ({t.stall_time_s:.2f}s); "
            + (f"prefetches {t.prefetch_issued} issued, {t.prefetch_used} used, {t.prefetch_wasted} wasted; "
               if t.prefetch_issued else "")
            + (f"task {self.task.last} ({self.task.confidence:.0%}), warm start {t.warm_loads} loads, "
               f"{t.warm_hits} hits; " if self.task.last else "")
            + (f"pruned to {self.task.pruned_to}: {t.pruned_share:.1%} of the routing weight dropped; "
               if self.task.pruned_to else "") +
            f"decode {self.decode_tokens} tokens at {self.decode_tokens_per_s:.2f} tokens/s"
        )
