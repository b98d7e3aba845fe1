"""Many prompts through one model: continuous batching, with a scheduler choosing each decode batch.

Requests are prefilled one by one into rows of a KV pool (in chunks of ``prefill_chunk`` prompt
tokens, so a long prompt never needs more experts at once than a chunk routes to); from then on
they are "ready". Each decode step the scheduler (offload/rearrange.py) picks up to
``batch_size`` ready requests; a finished request frees its row and the next prompt joins. A
request's tokens do not depend on which others share its steps: every row attends only to its
own keys, and each expert runs over the tokens routed to it.

The ``expert-aware`` scheduler groups requests whose next routes (their last step's routes, a
prev-token prediction) overlap, so a step needs fewer distinct experts and the cache loads less.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .generate import _filter_logits
from .model import KVPool, MoEModel, rms_norm
from .rearrange import Request, admission_order, make_scheduler

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
    finish_reason: str = "length"  # "eos" | "length"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["completion"] = d.pop("text")
        return {**d, "completion_tokens": self.completion_tokens}


class _RouteCollector:
    """A route observer that keeps the last forward step's experts per MoE layer."""

    def __init__(self) -> None:
        self.layers: list[torch.Tensor] = []

    def __call__(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        self.layers.append(experts)

    def take(self) -> np.ndarray:
        """[tokens, moe layers, top_k] of the step just run."""
        out = torch.stack(self.layers, dim=1).numpy(force=True)
        self.layers.clear()
        return out


@dataclass
class _Active:
    request: Request
    completion: Completion
    row: int
    prompt: list[int]
    next_token: int = -1


def _first_layer_routes(model: MoEModel, prompts: Sequence[list[int]]) -> list[np.ndarray]:
    """A cheap guess of each prompt's routing: the first MoE layer's router on its token embeddings.

    Attention is skipped (its output is unknown before prefill), so this is a prediction only; it
    orders admission so that prompts with similar routes are prefilled, and then decode, together.
    """
    layer = next(lw for lw in model.layers if lw.router is not None)
    routes = []
    for ids in prompts:
        x = rms_norm(F.embedding(torch.tensor(ids, device=model.device), model.embed), layer.post_norm,
                     model.spec.rms_norm_eps)
        routes.append(torch.topk(F.linear(x, layer.router), model.spec.top_k, dim=-1).indices.numpy(force=True))
    return routes


@torch.inference_mode()
def generate_many(
    model: MoEModel,
    prompts: Sequence[list[int]],
    config: BatchConfig = BatchConfig(),
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_finish: Callable[[Completion], None] | None = None,
) -> list[Completion]:
    """Generate for every prompt (token-id lists); results come back in the prompts' order."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt encodes to no tokens", "remove empty prompts")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    spec = model.spec
    scheduler = make_scheduler(config.scheduler, config.batch_size, config.max_wait)
    moe_index = {layer: m for m, layer in enumerate(i for i, moe in enumerate(spec.moe_layers) if moe)}
    kv = KVPool(spec, min(config.pool, len(prompts)), max(map(len, prompts)) + max_new_tokens, model.dtype, model.device)
    order = range(len(prompts))
    if config.scheduler != "fifo":
        order = admission_order(_first_layer_routes(model, prompts))
    pending = deque(order)
    free_rows = list(range(kv.k[0].shape[0] - 1, -1, -1))
    ready: list[_Active] = []  # in admission order
    results: list[Completion | None] = [None] * len(prompts)
    eos = set(eos_token_ids)
    collector = _RouteCollector()
    model.route_observers.append(collector)

    def step(rows: list[int], ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        kv.select(torch.tensor(rows))
        logits = model.forward(ids, kv.attention_mask(ids.shape[1]), positions, kv, last_only=True)[:, -1].float()
        if do_sample:
            probs = _filter_logits(logits, temperature, 0, top_p).softmax(dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tokens = logits.argmax(dim=-1)
        return tokens, collector.take()

    def emit(a: _Active, token: int, route: np.ndarray) -> bool:
        """Record a generated token; True when the request is done (its row is then free)."""
        a.completion.token_ids.append(token)
        a.next_token, a.request.route = token, route
        done = token in eos or a.completion.completion_tokens >= max_new_tokens
        if done:
            a.completion.finish_reason = "eos" if token in eos else "length"
            results[a.request.id] = a.completion
            free_rows.append(a.row)
            if on_finish:
                on_finish(a.completion)
        return done

    try:
        while pending or ready:
            while pending and free_rows:  # continuous batching: a free row takes the next prompt
                i = pending.popleft()
                a = _Active(Request(i), Completion(i, None, len(prompts[i])), free_rows.pop(), list(prompts[i]))
                kv.reset(a.row)
                start_time = time.perf_counter()
                chunk = config.prefill_chunk or len(a.prompt)
                for start in range(0, len(a.prompt), chunk):
                    ids = torch.tensor([a.prompt[start : start + chunk]], device=model.device)
                    positions = torch.arange(start, start + ids.shape[1], device=model.device)[None]
                    token, routes = step([a.row], ids, positions)
                model.stats.prefill_tokens += len(a.prompt)
                model.stats.prefill_time_s += time.perf_counter() - start_time
                if not emit(a, int(token[0]), routes[-1]):
                    ready.append(a)
            if not ready:
                continue
            start_time = time.perf_counter()
            resident = [(moe_index[layer], e) for layer, e in model.cache.resident]
            picked = scheduler.pick([a.request for a in ready], resident)
            if not picked:
                raise RuntimeError(f"scheduler {config.scheduler!r} picked no request out of {len(ready)} ready")
            chosen = {id(r) for r in picked}
            batch = [a for a in ready if id(a.request) in chosen]
            scheduler.step_done([a.request for a in ready], picked)
            rows = [a.row for a in batch]
            ids = torch.tensor([[a.next_token] for a in batch], device=model.device)
            positions = kv.lengths[torch.tensor(rows, device=kv.lengths.device)][:, None]
            tokens, routes = step(rows, ids, positions)
            finished = {id(a) for a, t, r in zip(batch, tokens.tolist(), routes) if emit(a, t, r)}
            ready = [a for a in ready if id(a) not in finished]
            model.stats.decode_tokens += len(batch)
            model.stats.decode_time_s += time.perf_counter() - start_time
    finally:
        model.route_observers.remove(collector)
    return results  # type: ignore[return-value]
