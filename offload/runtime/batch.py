"""Many prompts through one model: continuous batching, with a scheduler choosing each decode batch.

A :class:`BatchEngine` owns a KV pool. Submitted requests wait until a row is free, are prefilled
into it (in chunks of ``prefill_chunk`` prompt tokens, so a long prompt never needs more experts at
once than a chunk routes to) and are then "ready". Each decode step the scheduler
(offload/runtime/rearrange.py) picks up to ``batch_size`` ready requests; a finished or cancelled request
frees its row and the next one joins. A request's tokens do not depend on which others share its
steps: every row attends only to its own keys, each expert runs over the tokens routed to it, and
each request is sampled with its own config and generator.

``generate_many`` runs a fixed list of prompts to completion; ``offload serve`` drives the same
engine with requests that arrive while others decode.

An exception in a request's prefill, its sampling or its token callback ends that request (finish reason
"error", the exception kept on it); one in a decode step's forward ends the requests of that step. The
engine itself goes on: its KV rows are freed and the expert cache releases its pins however a step ends,
so the next step runs on a consistent state. ``generate_many`` re-raises the first such error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from offload.errors import ConfigError
from offload.model.attention import rms_norm
from offload.model.forward import MoEModel, RouteCollector
from offload.model.kv import KVPool
from offload.runtime.generate import check_length, check_token_ids
from offload.runtime.rearrange import Request, Scheduler, admission_order, make_scheduler
from offload.runtime.sampling import SamplingConfig, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    """How many requests decode together and how they are chosen."""

    batch_size: int = 8          # requests per decode step
    scheduler: str = "fifo"      # rearrange.SCHEDULERS name: fifo | expert-aware
    max_wait: int = 4            # a ready request is picked after at most this many skipped steps
    pool_size: int = 0           # requests prefilled and ready at once (0: 2 x batch_size)
    prefill_chunk: int = 0       # prompt tokens per prefill forward (0: the whole prompt)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_wait", "pool_size", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise ConfigError(f"invalid {name.replace('_', '-')} {value!r}",
                                  "give a whole number" + (" >= 1" if name == "batch_size" else " >= 0"))
        make_scheduler(self.scheduler, self.batch_size, self.max_wait)  # an unknown name fails here

    @property
    def pool(self) -> int:
        return max(self.pool_size or 2 * self.batch_size, self.batch_size)


@dataclass
class Completion:
    """One request's result; ``to_dict()`` is a line of ``offload run --prompts-file ... --out``."""

    id: int
    prompt: str | None
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"  # "eos" | "length" | "stop" (stop string) | "cancelled" | "error"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["completion"] = d.pop("text")
        return {**d, "completion_tokens": self.completion_tokens}


# on_token(completion, token) -> True to stop the request now (a stop string was reached)
TokenCallback = Callable[[Completion, int], bool]


@dataclass(eq=False)
class BatchRequest:
    """A submitted request and its decoding state (the engine's, not the scheduler's)."""

    prompt: list[int]
    sampling: SamplingConfig
    completion: Completion
    generator: torch.Generator | None = None
    on_token: TokenCallback | None = None
    sched: Request = field(default_factory=lambda: Request(0))
    row: int = -1
    next_token: int = -1
    cancelled: bool = False
    error: Exception | None = None  # what ended it, when its finish reason is "error"

    def cancel(self) -> None:
        """Stop at the next step boundary and free the KV row (a client went away)."""
        self.cancelled = True


def first_layer_routes(model: MoEModel, prompts: Sequence[list[int]]) -> list[np.ndarray]:
    """A cheap guess of each prompt's routing: the first MoE layer's router on its token embeddings.

    Attention is skipped (its output is unknown before prefill), so this is a prediction only; it
    orders admission so that prompts with similar routes are prefilled, and then decode, together.
    """
    layer = next(lw for lw in model.layers if lw.router is not None)
    routes = []
    for ids in prompts:
        h = model.embed_tokens(torch.tensor(ids, device=model.device))
        x = layer.router_input(rms_norm(h, layer.post_norm, model.spec.rms_norm_eps), h)
        routes.append(layer.router.select(x)[0].numpy(force=True))  # the router's own top-k, best first
    return routes


class BatchEngine:
    """Continuous batching over a KV pool of ``rows`` sequences of up to ``capacity`` tokens each."""

    def __init__(self, model: MoEModel, config: BatchConfig, rows: int, capacity: int) -> None:
        self.model = model
        self.config = config
        self.scheduler: Scheduler = make_scheduler(config.scheduler, config.batch_size, config.max_wait)
        self.kv = KVPool(model.spec, rows, capacity, model.dtype, model.device, model.layer_stores)
        self.moe_index = {layer: m for m, layer in enumerate(i for i, moe in enumerate(model.spec.moe_layers) if moe)}
        self.waiting: deque[BatchRequest] = deque()
        self.ready: list[BatchRequest] = []  # in admission order
        self.free_rows = list(range(rows - 1, -1, -1))
        self.steps = 0  # decode steps run
        self._collector = RouteCollector()
        model.route_observers.append(self._collector)

    def close(self) -> None:
        if self._collector in self.model.route_observers:
            self.model.route_observers.remove(self._collector)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.ready)

    def submit(self, request: BatchRequest) -> BatchRequest:
        """Queue a request; it is prefilled when a row is free. Its prompt must fit the pool's capacity."""
        if not request.prompt:
            raise ConfigError("a prompt encodes to no tokens", "remove empty prompts")
        check_token_ids(request.prompt, self.model.spec.vocab_size, "a prompt")
        if len(request.prompt) + request.sampling.max_new_tokens > self.kv.capacity:
            raise ConfigError(f"prompt of {len(request.prompt)} tokens + {request.sampling.max_new_tokens} new tokens "
                              f"exceeds the context of {self.kv.capacity}", "shorten the prompt or max_new_tokens")
        request.sched = Request(request.completion.id)
        self.waiting.append(request)
        return request

    def step(self) -> list[BatchRequest]:
        """Admit what fits, then run one decode step; returns the requests that finished."""
        self.model.cache.check()  # an earlier step that failed left nothing pinned or half-loaded
        done = self._drop_cancelled() + self._admit()
        if self.ready:
            done += self._decode()
        return done

    # -- internals -------------------------------------------------------------------------
    def _forward(self, rows: list[int], ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        self.kv.select(torch.tensor(rows))
        logits = self.model.forward(ids, self.kv.attention_mask(ids.shape[1]), positions, self.kv, last_only=True)
        return logits[:, -1], self._collector.take()

    def _finish(self, r: BatchRequest, reason: str) -> None:
        r.completion.finish_reason = reason
        self.free_rows.append(r.row)

    def _emit(self, r: BatchRequest, token: int, route: np.ndarray) -> bool:
        """Record a generated token; True when the request is done (its row is then free)."""
        r.completion.token_ids.append(token)
        r.next_token, r.sched.route = token, route
        stop = r.on_token(r.completion, token) if r.on_token else False
        if token in r.sampling.eos_token_ids or stop or r.completion.completion_tokens >= r.sampling.max_new_tokens:
            self._finish(r, "eos" if token in r.sampling.eos_token_ids else "stop" if stop else "length")
            return True
        return False

    def _drop_cancelled(self) -> list[BatchRequest]:
        gone = [r for r in self.ready if r.cancelled]
        for r in gone:
            self._finish(r, "cancelled")
        self.ready = [r for r in self.ready if not r.cancelled]
        cancelled_waiting = [r for r in self.waiting if r.cancelled]
        for r in cancelled_waiting:
            r.completion.finish_reason = "cancelled"
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        return gone + cancelled_waiting

    def _fail(self, requests: list[BatchRequest], error: Exception) -> list[BatchRequest]:
        """End ``requests`` with ``error`` (their rows are freed; nothing of theirs stays in the engine)."""
        log.debug("ending %d request(s) on %s", len(requests), error, exc_info=error)
        for r in requests:
            r.error = error
            self._finish(r, "error")
        return requests

    def _admit(self) -> list[BatchRequest]:
        """Prefill waiting requests into free rows (continuous batching: a free row takes the next one)."""
        done = []
        while self.waiting and self.free_rows:
            r = self.waiting.popleft()
            r.row = self.free_rows.pop()
            try:
                finished = self._prefill(r)
            except Exception as e:  # noqa: BLE001 - this request's failure ends this request only
                done += self._fail([r], e)
                continue
            if finished:
                done.append(r)
            else:
                self.ready.append(r)
        return done

    def _prefill(self, r: BatchRequest) -> bool:
        """Prefill ``r`` into its row and emit its first token; True when that already finished it. A request that
        goes on to decode is announced to the request hook (task patterns) first."""
        self.kv.reset(r.row)
        start_time = time.perf_counter()
        chunk = self.config.prefill_chunk or len(r.prompt)
        chunks = []
        for start in range(0, len(r.prompt), chunk):
            ids = torch.tensor([r.prompt[start : start + chunk]], device=self.model.device)
            positions = torch.arange(start, start + ids.shape[1], device=self.model.device)[None]
            logits, routes = self._forward([r.row], ids, positions)
            chunks.append(routes)
        self.model.stats.prefill_tokens += len(r.prompt)
        self.model.stats.prefill_time_s += time.perf_counter() - start_time
        finished = self._emit(r, int(sample(logits, r.sampling, r.generator)[0]), routes[-1])
        if not finished:
            self._prefilled(np.concatenate(chunks))
        return finished

    def _prefilled(self, routes: np.ndarray) -> None:
        """Tell the request hook (task patterns) a request's prompt routed, before it decodes; the experts the
        running requests' last tokens used are theirs to keep."""
        if self.model.request_hook is None:
            return
        layers = self.model.moe_layers
        running = {(layers[m], int(e)) for r in self.ready if r.sched.route is not None
                   for m, row in enumerate(r.sched.route) for e in row}
        self.model.request_hook.prefilled(routes, running)

    def _decode(self) -> list[BatchRequest]:
        start_time = time.perf_counter()
        resident = [(self.moe_index[layer], e) for layer, e in self.model.cache.resident]
        picked = self.scheduler.pick([r.sched for r in self.ready], resident)
        if not picked:
            raise RuntimeError(f"scheduler {self.config.scheduler!r} picked no request out of {len(self.ready)} ready")
        chosen = {id(s) for s in picked}
        batch = [r for r in self.ready if id(r.sched) in chosen]
        self.scheduler.step_done([r.sched for r in self.ready], picked)
        rows = [r.row for r in batch]
        ids = torch.tensor([[r.next_token] for r in batch], device=self.model.device)
        positions = self.kv.lengths[torch.tensor(rows, device=self.kv.lengths.device)][:, None]
        try:
            logits, routes = self._forward(rows, ids, positions)
        except Exception as e:  # noqa: BLE001 - the step's requests end with it; the engine goes on
            done = self._fail(batch, e)
        else:
            done = [r for i, r in enumerate(batch) if self._next(r, logits[i : i + 1], routes[i])]
        self.ready = [r for r in self.ready if r not in done]
        self.steps += 1
        self.model.stats.decode_tokens += len(batch)
        self.model.stats.decode_time_s += time.perf_counter() - start_time
        return done

    def _next(self, r: BatchRequest, logits: torch.Tensor, route: np.ndarray) -> bool:
        """Sample and emit ``r``'s next token; True when it finished (a failure of its own finishes it too)."""
        try:
            return self._emit(r, int(sample(logits, r.sampling, r.generator)[0]), route)
        except Exception as e:  # noqa: BLE001 - this request's failure ends this request only
            self._fail([r], e)
            return True


@torch.inference_mode()
def generate_many(
    model: MoEModel,
    prompts: Sequence[list[int]],
    config: BatchConfig = BatchConfig(),
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    on_finish: Callable[[Completion], None] | None = None,
) -> list[Completion]:
    """Generate for every prompt (token-id lists); results come back in the prompts' order."""
    sampling = sampling or SamplingConfig(max_new_tokens=64)
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt encodes to no tokens", "remove empty prompts")
    if sampling.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    check_length(model.spec, max(map(len, prompts)), sampling.max_new_tokens)
    for n, p in enumerate(prompts):
        check_token_ids(list(p), model.spec.vocab_size, f"prompt {n}")
    capacity = max(map(len, prompts)) + sampling.max_new_tokens
    engine = BatchEngine(model, config, min(config.pool, len(prompts)), capacity)
    generator = generator or sampling.make_generator(model.device)
    order = range(len(prompts))
    if engine.scheduler.groups_admission:
        order = admission_order(first_layer_routes(model, prompts))
    for i in order:
        engine.submit(BatchRequest(list(prompts[i]), sampling, Completion(i, None, len(prompts[i])), generator))
    results: list[Completion | None] = [None] * len(prompts)
    try:
        while engine.busy:
            for r in engine.step():
                if r.error is not None:
                    raise r.error
                results[r.completion.id] = r.completion
                if on_finish:
                    on_finish(r.completion)
    finally:
        engine.close()
    return results  # type: ignore[return-value]
