"""Task expert patterns (PreMoe, Pei et al. 2025): which experts a task needs, which task a prompt is, what to keep.

PreMoe observes that MoE experts specialise by task strongly enough that a task runs on a fraction of them. A
pattern holds, per MoE layer and expert, two numbers measured on a task's tokens:

* ``importance``: the task-conditioned expected selection score (TCESS). With ``K(t, l)`` token t's top-k at
  layer l and ``p(t, l, i) = w(t, l, i) / sum_j in K(t, l) w(t, l, j)`` the router's weight renormalised over its
  top-k (for softmax routers exactly the softmax over the top-k logits, which PreMoe's code takes),

      TCESS(l, i) = 1/N * sum_t  p(t, l, i) * [i in K(t, l)] * [p(t, l, i) >= r]

  over the task's N tokens: the expected routing weight an expert earns per token, counting only selections at
  least as confident as the threshold ``r`` (PreMoe's filter against low-confidence picks; ``DEFAULT_THRESHOLD``
  says which value and why). A layer's scores sum to at most 1; ranking them gives the experts to keep.
* ``frequency``: the share of the task's tokens whose top-k holds the expert (a layer sums to top_k). Matching
  and the predictors' prior use it: it is the probability that a token of the task routes to the expert.

Matching (PreMoe's task-adaptive expert retrieval, TAER) compares a prompt's own prefill routing with every task:
the mean per-token log-likelihood of the prompt's choices under each task's (smoothed) frequencies. Its softmax
over the tasks is the confidence (the posterior of one token's route under a uniform prior on tasks); below
``min_confidence`` no task is close and the ``generic`` pattern, every task's tokens pooled, is used. On tiny-moe's
two workloads it chose right on 40 of 40 held-apart prompts where the cosine of frequency vectors chose 38.

The file (``offload-expert-patterns/1``, JSON, written atomically) names the model it was measured on; a pattern
for another checkpoint is refused by name and shape.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offload.errors import ConfigError
from offload.files import write_json_atomic

FORMAT = "offload-expert-patterns/1"
GENERIC = "generic"
# r: of 0, 0.1, 0.2, 0.3 and 0.5, 0.3 pruned best on the bundled models (mean log-perplexity 3.3% under r = 0's over
# both models, both texts, 50% and 25% kept; docs/patterns.md): a second choice worth under 30% of a token's top-k
# weight says little about what the task needs. PreMoe's own code counts the top-1 choice alone.
DEFAULT_THRESHOLD = 0.3
MIN_CONFIDENCE = 0.6     # below it no task is close enough: the generic pattern is used
COVERAGE = (0.5, 0.8, 0.95)
_HINT = "write it again with `offload profile` (the format is in offload/memory/patterns.py)"


@dataclass(frozen=True)
class ModelIdentity:
    """What a pattern was measured on: the checkpoint's name and its MoE shape."""

    name: str
    architecture: str
    moe_layers: tuple[int, ...]  # model layer index of each MoE layer
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        if not self.moe_layers or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"bad model shape for patterns: {len(self.moe_layers)} MoE layers, "
                              f"{self.num_experts} experts, top-{self.top_k}")

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def describe(self) -> str:
        return f"{self.name!r} ({self.num_layers} MoE layers x {self.num_experts} experts, top-{self.top_k})"

    def check(self, other: ModelIdentity, source: str, measured: str = "was profiled on") -> None:
        """Refuse patterns (or a trace: ``measured``) of another checkpoint, by name, then by shape."""
        if self.name != other.name or (self.moe_layers, self.num_experts, self.top_k) != (
                other.moe_layers, other.num_experts, other.top_k):
            raise ConfigError(f"{source} {measured} {self.describe()}, not on {other.describe()}",
                              f"profile this model: offload profile {other.name} --task NAME=FILE --out PATTERNS")


def tcess(experts: np.ndarray, weights: np.ndarray, num_experts: int,
          threshold: float = DEFAULT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(TCESS importance, frequency), both [layers, experts], of tokens routed to ``experts`` with ``weights``
    (both [tokens, layers, top_k]); see the module docstring for the formula."""
    experts = np.asarray(experts, dtype=np.int64)
    n, layers, _ = experts.shape
    importance = np.zeros((layers, num_experts))
    frequency = np.zeros((layers, num_experts))
    if n == 0:
        return importance, frequency
    w = np.asarray(weights, dtype=np.float64)
    p = w / np.where(w.sum(-1, keepdims=True) > 0, w.sum(-1, keepdims=True), 1.0)  # renormalised over the top-k
    flat = (np.arange(layers)[None, :, None] * num_experts + experts).ravel()
    np.add.at(importance.reshape(-1), flat, np.where(p >= threshold, p, 0.0).ravel())
    np.add.at(frequency.reshape(-1), flat, 1.0)
    return importance / n, frequency / n


def _ranking(importance: np.ndarray, frequency: np.ndarray) -> np.ndarray:
    """Experts of each layer, most important first (ties: more frequent, then the lower id)."""
    ids = np.arange(importance.shape[1])
    return np.stack([np.lexsort((ids, -f, -i)) for i, f in zip(importance, frequency)])


@dataclass(frozen=True, eq=False)
class TaskPattern:
    """One task's measured routing: importance (TCESS) and frequency per MoE layer and expert."""

    name: str
    tokens: int
    importance: np.ndarray  # [layers, experts]
    frequency: np.ndarray   # [layers, experts]
    ranking: np.ndarray = field(default=None)  # type: ignore[assignment]  # [layers, experts], best first
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.ranking is None:
            object.__setattr__(self, "ranking", _ranking(self.importance, self.frequency))

    @classmethod
    def measure(cls, name: str, experts: np.ndarray, weights: np.ndarray, num_experts: int,
                threshold: float = DEFAULT_THRESHOLD, sources: Sequence[str] = ()) -> TaskPattern:
        importance, frequency = tcess(experts, weights, num_experts, threshold)
        return cls(name, int(np.shape(experts)[0]), importance, frequency, sources=tuple(sources))

    def top(self, keep: int) -> np.ndarray:
        """The ``keep`` most important experts of every layer, [layers, keep]."""
        return self.ranking[:, :keep]

    def ranked_keys(self) -> list[tuple[int, int]]:
        """(MoE layer, expert) over all layers, most important first: what warm start loads while slots last.

        A layer's scores sum to at most 1, so scores of different layers compare: a layer whose routing is spread
        thin gets fewer of the first places than one with a dominant expert."""
        layers, experts = np.nonzero(self.importance > 0)
        order = np.lexsort((experts, layers, -self.frequency[layers, experts], -self.importance[layers, experts]))
        return list(zip(layers[order].tolist(), experts[order].tolist()))

    def warm_keys(self, last: np.ndarray | None, slots: int) -> list[tuple[int, int]]:
        """What a warm start keeps and loads, (MoE layer, expert), at most ``slots``: the prompt's last token's
        route ``last`` ([layers, top_k]) first, then the ranked keys. The last token's experts are the likeliest
        of the first decode token's (a token's route resembles its predecessor's), and prefill has just loaded
        them: a warm start that evicted them for the task's average choice missed more, on tiny-moe's traces."""
        route = [] if last is None else [(m, int(e)) for m, row in enumerate(np.asarray(last)) for e in row]
        return list(dict.fromkeys(route + self.ranked_keys()))[:slots]

    def coverage(self, mass: float) -> np.ndarray:
        """[layers]: how many experts (best first) hold ``mass`` of each layer's importance."""
        ranked = np.take_along_axis(self.importance, self.ranking, axis=1)
        total = ranked.sum(axis=1, keepdims=True)
        share = np.cumsum(ranked, axis=1) / np.where(total > 0, total, 1.0)
        return np.minimum((share < mass - 1e-9).sum(axis=1) + 1, self.importance.shape[1])

    def log_frequency(self, top_k: int) -> np.ndarray:
        """log of the smoothed frequencies [layers, experts]: add-one smoothing towards top_k / E, so an expert the
        task never used is unlikely but possible (a prompt's single odd choice cannot veto its task)."""
        e = self.frequency.shape[1]
        return np.log((self.frequency * self.tokens + top_k / e) / (self.tokens + 1))

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "sources": list(self.sources), "layers": [
            {"importance": i.tolist(), "frequency": f.tolist(), "ranking": r.tolist()}
            for i, f, r in zip(self.importance, self.frequency, self.ranking)]}


def pooled(tasks: Iterable[TaskPattern], name: str = GENERIC) -> TaskPattern:
    """Every task's tokens as one task: TCESS and frequency are means over tokens, so the pool is their
    token-weighted mean, exactly what measuring all the tokens at once would give."""
    tasks = list(tasks)
    tokens = sum(t.tokens for t in tasks)
    if not tokens:
        raise ConfigError("no tokens to pool into a generic pattern", "give every task at least one token")
    importance = sum(t.importance * t.tokens for t in tasks) / tokens
    frequency = sum(t.frequency * t.tokens for t in tasks) / tokens
    return TaskPattern(name, tokens, importance, frequency, sources=tuple(s for t in tasks for s in t.sources))


@dataclass(frozen=True)
class Match:
    """Which task a prompt's routing looks like: ``task`` (``generic`` when none is close), its confidence, and
    every named task's mean per-token log-likelihood."""

    task: str
    confidence: float
    scores: Mapping[str, float] = field(default_factory=dict)
    forced: bool = False


@dataclass(frozen=True, eq=False)
class Patterns:
    """A patterns file: the model it belongs to, the TCESS threshold, and the tasks (with ``generic``)."""

    model: ModelIdentity
    tasks: Mapping[str, TaskPattern]
    threshold: float = DEFAULT_THRESHOLD
    source: str = "patterns"

    def __post_init__(self) -> None:
        shape = (self.model.num_layers, self.model.num_experts)
        for t in self.tasks.values():
            if t.importance.shape != shape or t.frequency.shape != shape or t.ranking.shape != shape:
                raise ConfigError(f"{self.source}: task {t.name!r} is not [{shape[0]} layers, {shape[1]} experts]",
                                  _HINT)
        if GENERIC not in self.tasks:
            raise ConfigError(f"{self.source} has no {GENERIC!r} pattern", _HINT)

    @property
    def named(self) -> list[str]:
        """The tasks a prompt can match (every task but ``generic``)."""
        return [name for name in self.tasks if name != GENERIC]

    def task(self, name: str) -> TaskPattern:
        if name not in self.tasks:
            raise ConfigError(f"{self.source} has no task {name!r}", f"use one of: {', '.join(self.tasks)}")
        return self.tasks[name]

    def match(self, experts: np.ndarray, min_confidence: float = MIN_CONFIDENCE) -> Match:
        """TAER: the task whose frequencies best explain a prompt's routing ``experts`` [tokens, layers, top_k]."""
        experts = np.asarray(experts, dtype=np.int64)
        if not self.named or experts.shape[0] == 0:
            return Match(GENERIC, 0.0)
        counts = np.zeros((self.model.num_layers, self.model.num_experts))
        np.add.at(counts, (np.arange(experts.shape[1])[None, :, None], experts), 1.0)
        q = counts / experts.shape[0]  # the prompt's frequencies
        scores = {n: float((q * self.tasks[n].log_frequency(self.model.top_k)).sum()) for n in self.named}
        z = np.array(list(scores.values()))
        posterior = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        best = int(posterior.argmax())
        task = self.named[best] if posterior[best] >= min_confidence else GENERIC
        return Match(task, float(posterior[best]), scores)

    def to_json(self) -> dict[str, Any]:
        m = self.model
        return {"format": FORMAT,
                "model": {"name": m.name, "architecture": m.architecture, "moe_layers": list(m.moe_layers),
                          "num_experts": m.num_experts, "top_k": m.top_k},
                "importance": {"measure": "tcess", "threshold": self.threshold,
                               "formula": "mean over tokens of the top-k-renormalised routing weight, "
                                          "counted where it is >= threshold"},
                "tasks": {name: t.to_json() for name, t in self.tasks.items()}}

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary beside ``path``, renamed when complete)."""
        write_json_atomic(path, self.to_json(), indent=1)


def load_patterns(path: str | Path) -> Patterns:
    """Read and check a patterns file; any problem is one ConfigError naming the file and the field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"patterns file {path} does not exist", "write one with `offload profile`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"patterns file {path} cannot be read ({e})", _HINT) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON ({e.msg} at line {e.lineno}): truncated or not a patterns file",
                          _HINT) from None
    return _parse(obj, str(path))


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], kind) or isinstance(obj[key], bool):
        raise ConfigError(f"{where}: missing or bad {key!r}", _HINT)
    return obj[key]


def _parse(obj: Any, source: str) -> Patterns:
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt != FORMAT:
        raise ConfigError(f"{source}: format is {fmt!r}, expected {FORMAT!r}", _HINT)
    m = _need(obj, "model", dict, source)
    layers = _need(m, "moe_layers", list, f"{source}: model")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"{source}: model.moe_layers must list integers", _HINT)
    model = ModelIdentity(_need(m, "name", str, f"{source}: model"), str(m.get("architecture", "")), tuple(layers),
                          _need(m, "num_experts", int, f"{source}: model"), _need(m, "top_k", int, f"{source}: model"))
    threshold = _need(_need(obj, "importance", dict, source), "threshold", (int, float), f"{source}: importance")
    tasks = {name: _parse_task(name, t, model, f"{source}: task {name!r}")
             for name, t in _need(obj, "tasks", dict, source).items()}
    return Patterns(model, tasks, float(threshold), source)


def _parse_task(name: str, obj: Any, model: ModelIdentity, where: str) -> TaskPattern:
    tokens = _need(obj, "tokens", int, where)
    rows = _need(obj, "layers", list, where)
    if tokens < 1 or len(rows) != model.num_layers:
        raise ConfigError(f"{where}: needs tokens >= 1 and {model.num_layers} layers, has {tokens} and {len(rows)}",
                          _HINT)
    arrays = {}
    for key in ("importance", "frequency", "ranking"):
        try:
            arrays[key] = np.array([row[key] for row in rows], dtype=np.int64 if key == "ranking" else np.float64)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: every layer needs {key!r}, a list of {model.num_experts} numbers", _HINT) \
                from None
        if arrays[key].shape != (model.num_layers, model.num_experts) or not np.isfinite(arrays[key]).all():
            raise ConfigError(f"{where}: {key!r} must be {model.num_experts} finite numbers per layer", _HINT)
    if not (np.sort(arrays["ranking"], axis=1) == np.arange(model.num_experts)).all():
        raise ConfigError(f"{where}: a layer's 'ranking' is not a permutation of its experts", _HINT)
    return TaskPattern(name, tokens, arrays["importance"], arrays["frequency"], arrays["ranking"],
                       tuple(str(s) for s in obj.get("sources", [])))


def parse_prune(value: int | str, num_experts: int, top_k: int) -> int:
    """Experts kept per layer for ``--prune``: a count ("4"), a share ("50%") or a fraction ("0.5"), rounded up;
    at least the top_k every token routes to and at most every expert."""
    text = str(value).strip()
    if isinstance(value, bool) or not text:
        raise ConfigError(f"invalid --prune {value!r}", 'give experts per layer ("4"), a share ("50%") or "0.5"')
    if re.fullmatch(r"\d+", text):
        keep = int(text)
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%|(0?\.\d+|1(?:\.0*)?|0)", text):
        share = float(m.group(1)) / 100 if m.group(1) else float(m.group(2))
        keep = math.ceil(share * num_experts - 1e-9)
    else:
        raise ConfigError(f"cannot parse --prune {value!r}", 'give experts per layer ("4"), a share ("50%") or "0.5"')
    if keep > num_experts:
        raise ConfigError(f"--prune {value} keeps {keep} experts per layer, the model has {num_experts}",
                          f"give at most {num_experts} (100%)")
    if keep < top_k:
        raise ConfigError(f"--prune {value} keeps {keep} of {num_experts} experts per layer, fewer than the {top_k} "
                          "each token routes to", f"keep at least {top_k} ({top_k / num_experts:.1%})")
    return keep
