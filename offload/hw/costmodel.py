"""The per-miss choice on a GPU machine: fetch a missed expert into the GPU cache (today's path), or compute it
on the CPU where its host copy already is. Pure arithmetic over a :class:`~offload.hw.calibration.Calibration`; no
model code, so the MoE block asks it per miss and tests check its decisions on hand-made costs.

For one missed expert with ``n`` tokens routed to it this step (FreeToken's and Fiddler's idea; llama.cpp's
rule that host experts go to the GPU only for batches of >= 32 tokens is the prefill threshold)::

    read  = requests x request latency           (disk tier: either way reads it first; RAM tier: 0)
            + stored bytes / disk bandwidth
    fetch = read + slot bytes / H2D bandwidth + gpu_expert(n)
    cpu   = read + cpu_expert(n) + round-trip latency + 2 n hidden itemsize / H2D bandwidth
    value = p * (min(fetch(1), cpu(1)) - gpu_expert(1))

``gpu_expert`` and ``cpu_expert`` are the calibrated times of the whole expert in its format. ``value`` is what
caching buys: with probability ``p`` (the predictor's, or recent reuse) the expert is needed again soon, and that
later access is then a hit instead of a one-token miss costing the cheaper way. Modes (``--hybrid``):

* ``off``: always fetch;
* ``always``: the CPU whenever the host copy can compute it, else fetch;
* ``auto``: a batch of >= ``prefill_tokens`` tokens fetches; otherwise fetch when ``fetch - value <= cpu``.

It ignores, on purpose: that the CPU's work overlaps the GPU's work on resident experts (and fetches overlap
compute on the copy stream), the value of the expert a fetch evicts (LRU's victim, least recently used), the CPU
computing several misses of a layer one after another, and format conversions of the host copy. On a CPU device
(the degenerate case) "fetch" is a memcpy into a host slot and both ways compute on the CPU, so ``auto`` prefers
computing from the host copy, which equals the normal path's result.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.errors import ConfigError
from offload.hw.calibration import Calibration

HYBRID_MODES = ("off", "auto", "always")
PREFILL_TOKENS = 32  # llama.cpp: batches of >= 32 tokens copy host experts to the GPU


def check_mode(mode: str) -> str:
    """``mode`` if it is one of HYBRID_MODES, else a one-line ConfigError."""
    if mode not in HYBRID_MODES:
        raise ConfigError(f"invalid --hybrid {mode!r}", f"use one of: {', '.join(HYBRID_MODES)}")
    return mode


@dataclass(frozen=True)
class MissCosts:
    """What one miss costs each way, in seconds, and what having it cached is worth."""

    fetch_s: float  # read (disk tier) + H2D copy + GPU compute
    cpu_s: float    # read (disk tier) + CPU compute + the hidden states' round trip
    value_s: float  # expected saving on a later access if it is fetched (and so cached)


def decide(mode: str, costs: MissCosts, tokens: int, host_can_compute: bool = True,
           prefill_tokens: int = PREFILL_TOKENS) -> str:
    """"fetch" or "cpu" for one miss under ``mode`` (see the module's docstring)."""
    check_mode(mode)
    if mode == "off" or not host_can_compute:
        return "fetch"
    if mode == "always":
        return "cpu"
    if tokens >= prefill_tokens:
        return "fetch"
    return "fetch" if costs.fetch_s - costs.value_s <= costs.cpu_s else "cpu"


@dataclass(frozen=True)
class ExpertCostModel:
    """The costs of a miss for one model's experts on one device and tier; built once, asked per miss."""

    calibration: Calibration
    device: str            # "cuda", or "cpu" (the degenerate case: both ways compute on the host)
    tier: str              # "ram" or "disk": where a missed expert's host copy comes from
    params: int            # parameters of one expert (3 x hidden x intermediate)
    slot_nbytes: int       # bytes a fetch copies into a slot
    stored_nbytes: int     # bytes a disk-tier miss reads
    gpu_format: str        # calibration keys of the expert's compute on each side (ExpertFormat.compute_key)
    cpu_format: str
    hidden: int
    activation_itemsize: int = 2
    prefill_tokens: int = PREFILL_TOKENS
    reads: float = 1.0     # read requests a disk-tier miss issues (CheckpointPlan.reads_per_expert)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") or self.tier not in ("ram", "disk"):
            raise ConfigError(f"no cost model for device {self.device!r} and tier {self.tier!r}")

    def read_s(self) -> float:
        """Seconds to bring the expert's bytes into host memory: its disk reads for the disk tier, else nothing."""
        if self.tier != "disk":
            return 0.0
        return self.reads * self.calibration.disk_request_s + self.stored_nbytes / self.calibration.disk_read_bandwidth

    def copy_s(self) -> float:
        """Seconds to put it in a slot once it is in host memory: H2D on CUDA, one thread's memcpy for a CPU slot
        from the RAM tier (the CPU mover's copy); a disk read lands in a CPU slot directly."""
        c = self.calibration
        if self.device == "cuda":
            return self.slot_nbytes / c.h2d_bandwidth
        return self.slot_nbytes / c.host_copy_bandwidth if self.tier == "ram" else 0.0

    def device_expert_s(self, tokens: int) -> float:
        c = self.calibration
        if self.device == "cpu":
            return c.cpu_expert_s(self.gpu_format, self.params, tokens)
        return c.gpu_expert_s(self.gpu_format, self.params, tokens)

    def fetch_s(self, tokens: int) -> float:
        return self.read_s() + self.copy_s() + self.device_expert_s(tokens)

    def cpu_s(self, tokens: int) -> float:
        c, compute = self.calibration, self.calibration.cpu_expert_s(self.cpu_format, self.params, tokens)
        if self.device == "cpu":
            return self.read_s() + compute
        moved = 2 * tokens * self.hidden * self.activation_itemsize  # hidden states down, the output back up
        return self.read_s() + compute + c.roundtrip_latency_s + moved / c.h2d_bandwidth

    def costs(self, tokens: int, reuse: float) -> MissCosts:
        """Both ways' costs for a miss with ``tokens`` tokens; ``reuse`` in [0, 1] is the probability that the
        expert is needed again soon (the predictor's, or 1 for an expert reused in the last steps)."""
        if not 0.0 <= reuse <= 1.0:
            raise ConfigError(f"reuse probability must lie in [0, 1], got {reuse}")
        later = min(self.fetch_s(1), self.cpu_s(1)) - self.device_expert_s(1)
        return MissCosts(self.fetch_s(tokens), self.cpu_s(tokens), reuse * max(later, 0.0))

    def decide(self, mode: str, tokens: int, reuse: float = 0.0, host_can_compute: bool = True) -> str:
        """"fetch" or "cpu" for one miss (see :func:`decide`)."""
        return decide(mode, self.costs(tokens, reuse), tokens, host_can_compute, self.prefill_tokens)
