"""The predictor interface: after MoE layer ``l`` routes, score the experts of layers l+1 .. l+d.

One interface serves the runtime's prefetcher and offline evaluation on routing traces, so a
predictor is judged on traces with exactly the code that later moves bytes. Layers here are MoE
layer indices (0 .. num_layers-1 over the model's MoE layers, as in trace files); the runtime maps
them to model layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from offload.errors import ConfigError


@dataclass(frozen=True)
class MoEShape:
    """The routing shape a predictor is built for (a trace header or a model spec gives it)."""

    num_layers: int   # MoE layers
    num_experts: int  # experts per layer
    top_k: int

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_experts, self.top_k) < 1 or self.top_k > self.num_experts:
            raise ConfigError(f"bad MoE shape: {self.num_layers} layers, {self.num_experts} experts, top-{self.top_k}")


@dataclass(frozen=True, eq=False)
class RouteContext:
    """What is known when MoE layer ``layer`` has just routed a step of ``tokens`` tokens.

    ``path[t, j]`` are token t's top-k experts at layers 0..layer of this step (top-1 first).
    ``prev[t]`` is the full route of the token before t in the same sequence ([layers, top_k]);
    rows of -1 where there is none (a sequence's first token, or prefill tokens whose predecessor
    is routed in the same step). ``hidden`` is the residual stream entering layer ``layer``'s
    MoE block, [tokens, hidden] (runtime only; None on traces).

    ``layer == -1`` asks about the next token before any of its layers has routed (the prefetcher
    looking across the token boundary, see :func:`next_token_context`): ``path`` is empty and
    ``prev`` is the current token's route so far (-1 at the layers it has not reached yet).
    """

    layer: int
    path: np.ndarray               # [tokens, layer + 1, top_k] int
    prev: np.ndarray               # [tokens, num_layers, top_k] int, -1 = unknown
    hidden: object | None = None   # torch.Tensor [tokens, hidden] in the runtime

    @property
    def tokens(self) -> int:
        return int(self.path.shape[0])


class Predictor(ABC):
    """Scores experts of the next layers. Subclasses register by ``name`` in PREDICTORS."""

    name: ClassVar[str]
    needs_hidden: ClassVar[bool] = False  # True: runtime only (traces carry no hidden states)
    across_tokens: ClassVar[bool] = True  # scores a context with layer -1 (the next token, from prev alone)
    prior: np.ndarray | None = None       # [layers, experts]: the request's task pattern (see set_prior)

    def __init__(self, shape: MoEShape) -> None:
        self.shape = shape

    @classmethod
    def from_model(cls, model: Any, shape: MoEShape, checkpoint_dir: Path, **options: Any) -> Predictor:
        """Build for a loaded model (the runtime's MoEModel, duck-typed: predictors never import it).

        The default ignores the model; predictors that need its weights (pregate) or files beside
        the checkpoint (learned) override this, so the runtime wires every predictor the same way.
        """
        return cls(shape, **options)

    @abstractmethod
    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        """Scores [min(lookahead, layers left), tokens, num_experts] for layers layer+1 ..; higher = likelier.

        Scores need not be probabilities; only their order within a (layer, token) row matters.
        """

    def observe(self, experts: np.ndarray, prev: np.ndarray) -> None:
        """Learn online from completed tokens: ``experts`` [tokens, layers, top_k], ``prev`` as in RouteContext."""

    def set_prior(self, prior: np.ndarray | None) -> None:
        """A request's task pattern, before its decode: [layers, experts], the probability that a token of the task
        routes to each expert (offload/memory/patterns.py; None forgets it). Predictors with a prior term (markov,
        and learned on markov's terms) put it there; the others keep it unused."""
        if prior is not None and np.shape(prior) != (self.shape.num_layers, self.shape.num_experts):
            raise ConfigError(f"a prior must be [{self.shape.num_layers}, {self.shape.num_experts}], "
                              f"got {list(np.shape(prior))}")
        self.prior = None if prior is None else np.clip(np.asarray(prior, dtype=np.float64), 1e-6, 1.0)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Scores [..., num_experts] -> the probability that each expert is among the token's top-k.

        The default is a softmax over the experts scaled to sum to top_k and clipped at 1 (right for
        log-probability scores such as markov's); predictors with calibrated outputs override it.
        """
        z = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return np.minimum(self.shape.top_k * z / z.sum(axis=-1, keepdims=True), 1.0)


PREDICTORS: dict[str, type[Predictor]] = {}


def register(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: make a predictor constructible by name."""
    PREDICTORS[cls.name] = cls
    return cls


def next_token_context(route: np.ndarray) -> RouteContext:
    """Before the next token's first layer: ``route`` [tokens, layers, top_k], the current tokens' routes
    so far (-1 at layers not reached yet), becomes ``prev``; nothing of the next token is known."""
    route = np.asarray(route, dtype=np.int64)
    return RouteContext(-1, np.zeros((route.shape[0], 0, route.shape[2]), dtype=np.int64), route)


def next_token_layers(layer: int, lookahead: int, num_layers: int) -> int:
    """How many of the next token's first layers lie within ``lookahead`` of ``layer`` (never more than
    layer + 1: the ones the current token has already passed)."""
    return max(0, min(layer + lookahead - num_layers + 1, layer + 1))


def step_probabilities(predictor: Predictor, scores: np.ndarray) -> np.ndarray:
    """[tokens, num_experts] scores of one layer -> [num_experts]: the probability that any token uses each expert."""
    return 1.0 - np.prod(1.0 - predictor.probabilities(scores), axis=0)


def top_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best experts per row of ``scores`` [..., num_experts], best first (stable on ties)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


def prev_routes(seq: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Each token's predecessor's route in its own sequence, [tokens, layers, top_k]; -1 at a sequence's start.

    ``seq`` [tokens] and ``experts`` [tokens, layers, top_k] are in execution order (as in a trace),
    so sequences may interleave.
    """
    prev = np.full(experts.shape, -1, dtype=np.int64)
    last: dict[int, int] = {}
    for t, s in enumerate(seq.tolist()):
        if s in last:
            prev[t] = experts[last[s]]
        last[s] = t
    return prev


def shape_of(trace: Any) -> MoEShape:
    """The MoE shape a trace's header names (any object with ``header.num_layers/num_experts/top_k``)."""
    h = trace.header
    return MoEShape(h.num_layers, h.num_experts, h.top_k)


def check_shape(predictor: Predictor, trace: Any) -> None:
    """A predictor built for one MoE shape cannot score a trace of another."""
    if predictor.shape != shape_of(trace):
        raise ConfigError(f"{trace.path or 'trace'} has shape {shape_of(trace)}, the {predictor.name} predictor "
                          f"was built for {predictor.shape}")
