"""Predicted decode speed of a configuration (budget, tier, device, hybrid) from a calibration, a checkpoint's
sizes and the miss rate its cache would have: what ``offload plan`` prints and ``scripts/bench_decode.py`` puts
beside each measurement. In the spirit of MoE-Lens's performance model: a sum of bytes over bandwidths and
parameters over compute rates, so each term can be checked against a measurement.

One decode token (batch 1), ``a = moe_layers x top_k`` expert uses of which ``m`` miss::

    time  = layers x overhead                                      (Python, dispatch, launches: calibrated
                                                                    on tiny-moe, whose weights take no time)
          + dense parameters read per token x dense(1)             (attention, router, lm_head: one-token
                                                                    GEMVs in the compute dtype, at the rate
                                                                    calibrated for a float expert, not at
                                                                    the triad's bandwidth, which a GEMV
                                                                    reaches only half of on this CPU)
          + (a - m) x expert(1)                                    (hits: compute on the device)
          + m x miss(1)                                            (fetch: read (requests x latency + bytes
                                                                    / bandwidth) + copy + compute + the cache's
                                                                    bookkeeping per miss; hybrid: the
                                                                    cheaper of that and the CPU, hw/costmodel.py)
    stall = m x (miss(1) - expert(1)),   bytes moved = m x the bytes a miss moves into the cache

``m`` comes from a routing trace replayed through the simulator with one global LRU cache of the budget's slots
(the runtime's cache and policy), or, without a trace, from uniform routing: every expert equally likely, so an
access hits with probability slots / experts. It ignores attention's and the KV cache's growth with the context
(the overhead term is measured on a short one), the router's and norms' arithmetic beyond their weight bytes,
any overlap of loads with compute (a predictor's prefetches are counted as stalls), the format conversion a
disk-tier miss of a quantized expert pays, a disk read's page-cache effects, and the warm-up of prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from offload.amounts import parse_budget
from offload.errors import ConfigError
from offload.hw.calibration import Calibration
from offload.hw.costmodel import ExpertCostModel

NEAR_BEST = 0.95  # the recommended budget is the smallest within 5% of the fastest that fits

MissRate = Callable[[int], tuple[float, float]]  # slots -> (hit rate, misses per token)


@dataclass(frozen=True)
class ModelSizes:
    """What the model needs to know of a checkpoint: bytes, parameters and shape."""

    dense_nbytes: int            # every resident weight in the compute dtype (what must fit)
    dense_nbytes_per_token: int  # those a decode token reads: all but the embedding table (a row), unless tied
    stored_nbytes: int           # one expert as a disk-tier miss reads it
    slot_nbytes: int             # one expert in a cache slot: what a RAM-tier or H2D copy moves
    params: int                  # parameters of one expert
    num_layers: int              # decoder layers (dense ones too: each pays the per-layer overhead)
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    fmt: str                     # calibration key of an expert's compute on the device (ExpertFormat.compute_key)
    cpu_fmt: str                 # ... and of its host copy on the CPU (hybrid's other side)
    itemsize: int = 2            # the compute dtype's bytes (dense weights, the hybrid round trip's hidden states)
    dense_fmt: str = "bfloat16"  # calibration key of the dense weights' GEMVs: the compute dtype
    reads_per_miss: float = 1.0  # read requests a disk-tier miss issues (a GGUF file's experts: one per tensor)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def active(self) -> int:
        """Expert uses of one decode token."""
        return self.num_moe_layers * self.top_k


@dataclass(frozen=True)
class TokenCost:
    """One decode token's predicted time, stall and bytes moved."""

    seconds: float
    stall_s: float
    bytes_moved: float
    dense_s: float      # the per-layer overhead and the dense weights' GEMVs
    misses: float
    cpu_experts: float  # misses computed on the CPU (hybrid)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds


def token_cost(sizes: ModelSizes, calibration: Calibration, device: str, tier: str, misses: float,
               hybrid: str = "off", reuse: float = 0.0) -> TokenCost:
    """The formula of the module's docstring for ``misses`` misses per token (every expert gets one token).

    ``reuse``: the chance a fetched expert is used again while cached, for hybrid's value term (the planner
    passes the cache's hit rate)."""
    if not 0 <= misses <= sizes.active:
        raise ConfigError(f"misses per token must lie in 0..{sizes.active}, got {misses}")
    c = calibration
    gemv, overhead = (c.gpu_expert_s, c.gpu_layer_overhead_s) if device == "cuda" else \
        (c.cpu_expert_s, c.layer_overhead_s)
    dense_s = sizes.num_layers * overhead + gemv(sizes.dense_fmt, sizes.dense_nbytes_per_token // sizes.itemsize, 1)
    m = ExpertCostModel(calibration, device, tier, sizes.params, sizes.slot_nbytes, sizes.stored_nbytes, sizes.fmt,
                        sizes.cpu_fmt, sizes.hidden, sizes.itemsize, reads=sizes.reads_per_miss)
    hit_s = m.device_expert_s(1)
    on_cpu = device == "cuda" and m.decide(hybrid, 1, reuse) == "cpu"
    miss_s = m.cpu_s(1) if on_cpu else m.fetch_s(1) + c.miss_overhead_s  # a fetch also pays the cache's bookkeeping
    per_miss = sizes.stored_nbytes if tier == "disk" else (0 if on_cpu else sizes.slot_nbytes)
    return TokenCost(dense_s + (sizes.active - misses) * hit_s + misses * miss_s, misses * (miss_s - hit_s),
                     misses * per_miss, dense_s, misses, misses if on_cpu else 0.0)


# -- miss rates ------------------------------------------------------------------------------------------


def uniform_miss_rate(sizes: ModelSizes) -> MissRate:
    """Uniform routing: each access hits with probability slots / experts (an LRU cache of independent, equally
    likely keys holds ``slots`` of them), so a token misses active x (1 - slots / experts)."""
    def rate(slots: int) -> tuple[float, float]:
        hit = min(slots / sizes.total_experts, 1.0)
        return hit, sizes.active * (1.0 - hit)
    return rate


# -- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One configuration's predicted decode figures, and whether it fits this machine's memory."""

    tier: str
    budget: str
    slots: int
    device: str
    hybrid: str
    hit_rate: float
    misses_per_token: float
    cpu_experts_per_token: float
    bytes_per_token: float
    stall_s_per_token: float
    seconds_per_token: float
    memory_nbytes: int      # on the device: dense weights + slots (the RAM tier also holds every expert in RAM)
    fits: bool | None       # None: the device's free memory is unknown (planning for a GPU this machine lacks)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


Fits = Callable[[str, int], "bool | None"]  # (tier, slots) -> fits this machine (None: unknown), memory/budget.py


def predict(sizes: ModelSizes, calibration: Calibration, device: str, tiers: Sequence[str], budgets: Sequence[str],
            miss_rate: MissRate, fits: Fits) -> list[Prediction]:
    """Every (tier, budget) and, on CUDA, hybrid off and auto: the predictions in that order. ``fits`` says
    whether a tier's slots fit this machine (the fit check, memory/budget.py, which the planner passes in)."""
    out = []
    modes = ("off", "auto") if device == "cuda" else ("off",)
    for tier in tiers:
        for budget in budgets:
            slots = parse_budget(budget, sizes.total_experts, sizes.slot_nbytes)
            hit, misses = miss_rate(slots)
            memory_nbytes, fit = sizes.dense_nbytes + slots * sizes.slot_nbytes, fits(tier, slots)
            for mode in modes:
                cost = token_cost(sizes, calibration, device, tier, misses, mode, reuse=hit)
                out.append(Prediction(tier, budget, slots, device, mode, hit, misses, cost.cpu_experts,
                                      cost.bytes_moved, cost.stall_s, cost.seconds, memory_nbytes, fit))
    return out


def recommend(predictions: Sequence[Prediction]) -> Prediction | None:
    """The fewest slots within NEAR_BEST of the fastest configuration that fits (memory it leaves for the KV
    cache and other programs), the faster of equals; None when nothing fits."""
    candidates = [p for p in predictions if p.fits is not False]
    if not candidates:
        return None
    best = max(p.tokens_per_s for p in candidates)
    near = [p for p in candidates if p.tokens_per_s >= NEAR_BEST * best]
    return min(near, key=lambda p: (p.slots, -p.tokens_per_s))

