"""Trace-driven simulation of continuous batching: what a scheduler does to expert loads, without a model.

Every decode sequence of a routing trace is a request whose steps are its decode tokens' routes, in
order. :func:`make_workload` samples as many requests as asked (sequences drawn with replacement,
each from a random start offset, seeded). :func:`simulate_batching` then runs the runtime's loop
(``offload/runtime/batch.py``) over them: requests arrive (all at step 0, or as a Poisson process), are
admitted into a pool of ``pool`` ready requests (a KV row each), and each step the scheduler picks a
batch; every picked request emits its next route from the trace. The scheduler sees a request's
previous route as its prediction (``prediction="prev-token"``, what the runtime has) or, as an upper
bound, the route it is about to take (``"oracle"``).

A step runs each distinct expert of a layer once over the tokens routed to it, so the step's
accesses are, layer by layer, the distinct experts of the batch; they go through one global cache of
(layer, expert) keys, the prediction-aware twin of :mod:`offload.sim.simulate` (same policies, same
counts as its numba kernel), whose resident keys the scheduler also sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offload.errors import ConfigError
from offload.runtime.rearrange import Request, Scheduler, admission_order, distinct_experts, make_scheduler
from offload.sim.simulate import AccessStream, _PyCaches, check_policy
from offload.stats import ratio
from offload.traces.format import PHASES, Trace

PREDICTIONS = ("prev-token", "oracle")
ADMISSIONS = ("similar", "arrival")


@dataclass(frozen=True, eq=False)
class SimRequest:
    """One request of a workload: the routes it will take, and what is known before its first step."""

    routes: np.ndarray  # [steps, layers, top_k] expert ids, one row per generated token
    prefix: np.ndarray  # [tokens, layers, top_k] routes of the tokens before its first step (its "prompt")
    source: tuple[int, int]  # (trace seq, decode offset) it was cut from

    @property
    def steps(self) -> int:
        return int(self.routes.shape[0])

    @property
    def prior(self) -> np.ndarray | None:
        """[layers, top_k] route of the token before its first step, the first prev-token prediction."""
        return self.prefix[-1] if len(self.prefix) else None


def decode_sequences(trace: Trace) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """seq -> (prefill routes, decode routes) in file order, for every seq with at least one decode token."""
    decode = PHASES.index("decode")
    out = {}
    for seq in np.unique(trace.seq).tolist():
        rows = trace.seq == seq
        phase = trace.phase[rows]
        if (phase == decode).any():
            out[seq] = (trace.experts[rows][phase != decode], trace.experts[rows][phase == decode])
    return out


def make_workload(trace: Trace, num_requests: int, seed: int = 0, min_tokens: int = 16,
                  relabel: bool = False) -> list[SimRequest]:
    """``num_requests`` requests cut from the trace's decode sequences, drawn with replacement
    (0: every sequence once, whole: distinct prompts, nothing shared but what routing shares).

    Each starts at a uniform offset that leaves it at least ``min_tokens`` steps (a shorter
    sequence is taken whole) and runs to the sequence's end; its prefix is the sequence's prefill
    and the decode tokens before the offset. A trace with few sequences gives many requests cut at
    the same place, identical from start to end: far more alike than distinct users' requests.

    ``relabel``, the control: the expert ids of each request are permuted at every layer (one
    random permutation per request and layer). That removes every correlation between requests
    (shared expert preferences, duplicates) and keeps each request's own reuse from step to step,
    so what a scheduler still gains on it is chance, not locality across requests.
    """
    if num_requests < 0 or min_tokens < 1:
        raise ConfigError(f"need >= 0 requests of >= 1 token, got {num_requests} and {min_tokens}")
    sequences = decode_sequences(trace)
    if not sequences:
        raise ConfigError(f"{trace.path or 'trace'} has no decode tokens", "record a trace with generation")
    rng = np.random.default_rng(seed)
    relabel_rng = np.random.default_rng([seed, 1])  # its own stream: the same requests with or without
    seqs = sorted(sequences)
    whole = num_requests == 0
    out = []
    for seq in seqs if whole else rng.choice(seqs, size=num_requests).tolist():
        prefill, decode = sequences[seq]
        offset = 0 if whole else int(rng.integers(0, max(len(decode) - min_tokens, 0) + 1))
        routes, prefix = decode[offset:], np.concatenate([prefill, decode[:offset]])
        if relabel:
            layers, experts = trace.header.num_layers, trace.header.num_experts
            perm = relabel_rng.permuted(np.tile(np.arange(experts, dtype=routes.dtype), (layers, 1)), axis=1)
            routes, prefix = (perm[np.arange(layers)[None, :, None], a] for a in (routes, prefix))
        out.append(SimRequest(routes, prefix, (seq, offset)))
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair of tokens ([n, layers, top_k] each), the share of experts they have in common, averaged over layers."""
    return (a[..., :, None] == b[..., None, :]).sum(axis=(-1, -2)).mean(axis=-1) / a.shape[-1]


def locality(trace: Trace, pairs: int = 4000, seed: int = 0) -> dict[str, float]:
    """How alike the trace's decode routes are: what grouping requests can exploit (1: the same experts).

    The share of experts two tokens have in common, averaged over layers, for: a token and the one
    before it in its sequence (``prev_token``, how good the prev-token prediction is), random pairs
    within one sequence (``same_seq``) and from two sequences (``other_seq``), against ``chance``
    (top_k / num_experts, for routes drawn uniformly).
    """
    sequences = [d for _, d in decode_sequences(trace).values()]
    rng = np.random.default_rng(seed)
    tokens = np.concatenate(sequences)  # [tokens, layers, top_k]
    lengths = np.array([len(d) for d in sequences])
    owner = np.repeat(np.arange(len(sequences)), lengths)
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    consecutive = np.concatenate([_overlap(d[1:], d[:-1]) for d in sequences if len(d) > 1] or [np.zeros(0)])
    a = rng.integers(0, len(tokens), size=pairs)
    a = a[lengths[owner[a]] > 1]
    shift = rng.integers(1, lengths[owner[a]])  # another token of the same sequence
    same = start[owner[a]] + (a - start[owner[a]] + shift) % lengths[owner[a]]
    b, c = rng.integers(0, len(tokens), size=(2, pairs))
    keep = owner[b] != owner[c]  # pairs of tokens of two sequences
    other = _overlap(tokens[b[keep]], tokens[c[keep]])

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return {"prev_token": mean(consecutive), "same_seq": mean(_overlap(tokens[a], tokens[same])),
            "other_seq": mean(other), "chance": trace.header.top_k / trace.header.num_experts}


@dataclass(frozen=True)
class BatchSimConfig:
    """One simulated run: the scheduler, the pool, the cache and how requests arrive."""

    scheduler: str = "fifo"
    batch_size: int = 8
    max_wait: int = 4
    resident_weight: float = 0.5
    """expert-aware: cost of a key already cached, against 1 for one that must be loaded."""
    capacity: int = 64
    """(layer, expert) keys the one global cache holds."""
    policy: str = "lru"
    pool_size: int = 0
    """Requests ready (prefilled) at once; 0: 2 x batch_size, as the runtime's BatchConfig."""
    arrival_rate: float = 0.0
    """Requests arriving per decode step (Poisson); 0: all at step 0."""
    admission: str = "similar"
    """Non-fifo schedulers with all requests at step 0 admit in admission_order of the prefixes'
    first-layer routes (as the runtime does); "arrival" always admits in arrival order."""
    prediction: str = "prev-token"
    seed: int = 0

    def __post_init__(self) -> None:
        make_scheduler(self.scheduler, self.batch_size, self.max_wait)  # validates name and sizes
        check_policy(self.policy)
        if self.policy == "belady":
            raise ConfigError("belady needs the whole future access stream", "use lru, lfu or fifo")
        if self.capacity < 1 or self.pool_size < 0 or self.arrival_rate < 0:
            raise ConfigError(f"invalid capacity {self.capacity}, pool {self.pool_size} or rate {self.arrival_rate}")
        if self.admission not in ADMISSIONS or self.prediction not in PREDICTIONS:
            raise ConfigError(f"invalid admission {self.admission!r} or prediction {self.prediction!r}",
                              f"use {' or '.join(ADMISSIONS)}, and {' or '.join(PREDICTIONS)}")

    @property
    def pool(self) -> int:
        return max(self.pool_size or 2 * self.batch_size, self.batch_size)

    def make_scheduler(self) -> Scheduler:
        return make_scheduler(self.scheduler, self.batch_size, self.max_wait, self.resident_weight)


@dataclass(frozen=True)
class BatchSimResult:
    """Counts and summaries of one run; waits and latencies are in decode steps."""

    requests: int
    tokens: int
    steps: int  # decode steps run (idle steps waiting for an arrival do not count)
    accesses: int
    loads: int  # cache misses: experts moved into the cache
    distinct_per_layer: float  # distinct experts per layer per step, mean over steps and layers
    wait_max: int  # the longest run of consecutive ready-but-not-picked steps of any request
    wait_p99: float  # 99th percentile over requests of each one's longest such run
    mean_latency: float  # arrival to last token, mean over requests
    p99_latency: float

    @property
    def loads_per_token(self) -> float:
        return ratio(self.loads, self.tokens)

    @property
    def tokens_per_step(self) -> float:
        return ratio(self.tokens, self.steps)

    def to_dict(self) -> dict[str, float]:
        return {**self.__dict__, "loads_per_token": self.loads_per_token, "tokens_per_step": self.tokens_per_step}


def _arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival step of each request: all 0, or the floor of a Poisson process's arrival times."""
    if rate == 0:
        return np.zeros(n, dtype=np.int64)
    return np.floor(np.cumsum(rng.exponential(1 / rate, size=n))).astype(np.int64)


def _admission(workload: list[SimRequest], config: BatchSimConfig) -> list[int]:
    if not config.make_scheduler().groups_admission or config.admission == "arrival" or config.arrival_rate > 0:
        return list(range(len(workload)))
    return admission_order([w.prefix[:, 0] for w in workload])


def _run_step(cache: _PyCaches, batch: np.ndarray, num_experts: int, keys_out: list[int] | None) -> tuple[int, int]:
    """One decode step through the cache; batch: [picked, layers, top_k] -> (accesses, loads).

    Layer by layer, each distinct expert of the batch is accessed once: it runs once, over its tokens.
    """
    keys = [layer * num_experts + e for layer in range(batch.shape[1]) for e in np.unique(batch[:, layer]).tolist()]
    loads = sum(not cache.access(k)[0] for k in keys)
    if keys_out is not None:
        keys_out.extend(keys)
    return len(keys), loads


def simulate_batching(workload: list[SimRequest], config: BatchSimConfig, num_experts: int,
                      keys_out: list[int] | None = None) -> BatchSimResult:
    """Run the workload through the scheduler and the cache; ``keys_out`` collects the access stream."""
    if not workload:
        raise ConfigError("an empty workload", "ask for at least one request")
    layers = workload[0].routes.shape[1]
    scheduler = config.make_scheduler()
    rng = np.random.default_rng(config.seed)
    arrive = _arrivals(len(workload), config.arrival_rate, rng)
    pending = _admission(workload, config)  # request indices, next to admit first
    next_admit = 0
    cache = _PyCaches(AccessStream(np.zeros(0, dtype=np.int32), layers, num_experts, 1), config.policy, "global",
                      config.capacity)
    requests = [Request(i) for i in range(len(workload))]
    done_steps = np.zeros(len(workload), dtype=np.int64)  # steps taken so far
    longest_wait = np.zeros(len(workload), dtype=np.int64)
    finish = np.zeros(len(workload), dtype=np.int64)
    ready: list[Request] = []  # in admission order, as the runtime keeps them
    step = decode_steps = accesses = loads = tokens = 0  # step: the clock, which idles between arrivals
    distinct_sum = 0.0
    while next_admit < len(pending) or ready:
        while next_admit < len(pending) and len(ready) < config.pool and arrive[pending[next_admit]] <= step:
            r = requests[pending[next_admit]]
            r.route = workload[r.id].prior
            ready.append(r)
            next_admit += 1
        if not ready:  # idle until the next arrival; idle steps are not decode steps
            step = int(arrive[pending[next_admit]])
            continue
        if config.prediction == "oracle":
            for r in ready:
                r.route = workload[r.id].routes[done_steps[r.id]]
        resident = [divmod(k, num_experts) for k in cache.resident[0]]
        picked = scheduler.pick(ready, resident)
        if not picked or len(picked) > config.batch_size:
            raise RuntimeError(f"scheduler {scheduler.name!r} picked {len(picked)} of {len(ready)} ready")
        scheduler.step_done(ready, picked)
        routes = [workload[r.id].routes[done_steps[r.id]] for r in picked]
        distinct_sum += float(distinct_experts(routes).mean())
        step_accesses, step_loads = _run_step(cache, np.stack(routes), num_experts, keys_out)
        accesses, loads = accesses + step_accesses, loads + step_loads
        for r, route in zip(picked, routes):
            r.route = route
            done_steps[r.id] += 1
        for r in ready:
            longest_wait[r.id] = max(longest_wait[r.id], r.waited)
        step += 1
        decode_steps += 1
        tokens += len(picked)
        for r in picked:
            if done_steps[r.id] == workload[r.id].steps:
                finish[r.id] = step
        ready = [r for r in ready if done_steps[r.id] < workload[r.id].steps]
    latency = finish - arrive
    return BatchSimResult(len(workload), tokens, decode_steps, accesses, loads, distinct_sum / decode_steps,
                          int(longest_wait.max()), float(np.percentile(longest_wait, 99)), float(latency.mean()),
                          float(np.percentile(latency, 99)))
