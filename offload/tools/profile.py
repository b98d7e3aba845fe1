"""`offload profile`: measure each task's expert pattern (TCESS, memory/patterns.py) and write a patterns file.

A task's tokens come from running its text through the model (prompts JSONL: each prompt; any other file: the
whole text, in windows of ``context`` tokens) or from routing traces it was recorded in (`offload trace`). Only
routing is needed, so the text is prefilled, never generated from. The file names the model (its name and MoE
shape) and holds one pattern per task plus ``generic``, every task's tokens pooled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from offload.checkpoint.locate import BUNDLED_DIR, bundled_models
from offload.checkpoint.plan import plan_config
from offload.errors import ConfigError
from offload.files import read_prompts
from offload.memory.patterns import DEFAULT_THRESHOLD, GENERIC, ModelIdentity, Patterns, TaskPattern, pooled
from offload.runtime.load import OffloadModel, identity
from offload.traces.format import read_trace

log = logging.getLogger(__name__)

Routes = tuple[np.ndarray, np.ndarray]  # experts, weights: [tokens, MoE layers, top_k] each
Progress = Callable[[str, int, int], None]  # (task, done, total)


def parse_sources(items: Iterable[str], option: str) -> dict[str, list[Path]]:
    """``NAME=FILE`` items -> {name: [files]} in the order given (a name may repeat to add files)."""
    out: dict[str, list[Path]] = {}
    for item in items:
        name, sep, file = item.partition("=")
        name = name.strip()
        if not sep or not name or not file:
            raise ConfigError(f"{option} {item!r} is not NAME=FILE", f"e.g. {option} code=snippets.jsonl")
        if name == GENERIC:
            raise ConfigError(f"{option} {item!r}: {GENERIC!r} is the pooled pattern every file gets",
                              "give the task another name")
        if not Path(file).is_file():
            raise ConfigError(f"{option} {item!r}: {file} does not exist", "give an existing file")
        out.setdefault(name, []).append(Path(file))
    return out


def texts_of(path: Path) -> list[str]:
    """A task file's texts: a prompts JSONL's prompts, or any other file's whole text."""
    if path.suffix == ".jsonl":
        return read_prompts(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 ({e.reason} at byte {e.start})", "convert it to UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty", "give the task some text")
    return [text]


class _Recorder:
    """A route observer keeping every routed token's experts and weights, layer by layer."""

    def __init__(self) -> None:
        self.experts: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def __call__(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        self.experts.append(experts.cpu())
        self.weights.append(weights.float().cpu())

    def take(self) -> Routes:
        experts = torch.stack(self.experts, dim=1).numpy()  # [tokens, MoE layers, top_k]
        weights = torch.stack(self.weights, dim=1).numpy()
        self.experts.clear()
        self.weights.clear()
        return experts, weights


def model_routes(model: OffloadModel, texts: Sequence[str], context: int = 512,
                 progress: Callable[[int, int], None] | None = None) -> Routes:
    """Every token's routing when ``texts`` are prefilled (each in windows of ``context`` tokens)."""
    if context < 1:
        raise ConfigError(f"invalid --context {context}", "give a whole number of tokens >= 1")
    windows = [ids[i : i + context] for text in texts for ids in [model.encode(text)[0]]
               for i in range(0, len(ids), context)]
    recorder = _Recorder()
    parts: list[Routes] = []
    model.model.route_observers.append(recorder)
    try:
        for n, window in enumerate(windows, 1):
            model(window[None])
            parts.append(recorder.take())
            if progress:
                progress(n, len(windows))
    finally:
        model.model.route_observers.remove(recorder)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def trace_identity(path: Path) -> tuple[ModelIdentity, Routes]:
    """A trace's model (its header's name and shape) and its tokens' routing."""
    trace = read_trace(path)
    h = trace.header
    layers = h.extra.get("moe_layers", list(range(h.num_layers)))
    if not isinstance(layers, list) or len(layers) != h.num_layers:
        layers = list(range(h.num_layers))
    model = ModelIdentity(h.model, str(h.extra.get("architecture", "")), tuple(layers), h.num_experts, h.top_k)
    return model, (trace.experts.astype(np.int64), trace.weights)


def model_identity(model: str) -> ModelIdentity | str:
    """What a model argument is without loading it: a bundled model's or a folder's identity (config.json), else
    (a hub id, maybe not downloaded) just its name, the traces then giving the shape."""
    path = BUNDLED_DIR / model if model in bundled_models() else Path(model).expanduser()
    return identity(plan_config(path)) if path.is_dir() else model


def profile(model: OffloadModel | None, tasks: Mapping[str, Sequence[Path]], traces: Mapping[str, Sequence[Path]],
            threshold: float = DEFAULT_THRESHOLD, context: int = 512, progress: Progress | None = None,
            ident: ModelIdentity | str | None = None) -> Patterns:
    """The patterns of ``tasks`` (files run through ``model``) and ``traces`` (recorded routing). They are for
    ``model``, or ``ident`` without one (a name alone takes the first trace's shape); every trace must come from
    that model and have its shape."""
    if not 0 <= threshold < 1:
        raise ConfigError(f"invalid --threshold {threshold}", "give r in [0, 1): 0 counts every selection")
    if not tasks and not traces:
        raise ConfigError("nothing to profile", "give --task NAME=FILE (run through the model) or --trace NAME=FILE")
    if tasks and model is None:
        raise ConfigError("--task needs the model loaded", "give a checkpoint the runtime can load")
    ident = identity(model.plan) if model is not None else ident
    routes: dict[str, list[Routes]] = {}
    sources: dict[str, list[str]] = {}
    for task, paths in tasks.items():
        texts = [t for p in paths for t in texts_of(p)]
        report = (lambda d, t, task=task: progress(task, d, t)) if progress else None
        routes.setdefault(task, []).append(model_routes(model, texts, context, report))
        sources.setdefault(task, []).extend(str(p) for p in paths)
    for task, paths in traces.items():
        for path in paths:
            trace_model, trace_routes = trace_identity(path)
            if not isinstance(ident, ModelIdentity):
                ident = ModelIdentity(ident or trace_model.name, trace_model.architecture, trace_model.moe_layers,
                                      trace_model.num_experts, trace_model.top_k)
            trace_model.check(ident, str(path), "was recorded on")
            routes.setdefault(task, []).append(trace_routes)
            sources.setdefault(task, []).append(str(path))
    return _patterns(ident, routes, sources, threshold)


def _patterns(ident: ModelIdentity, routes: Mapping[str, list[Routes]], sources: Mapping[str, list[str]],
              threshold: float) -> Patterns:
    found = {}
    for task, parts in routes.items():
        experts = np.concatenate([p[0] for p in parts])
        weights = np.concatenate([p[1] for p in parts])
        if len(experts) == 0:
            raise ConfigError(f"task {task!r} has no tokens", "give it some text")
        found[task] = TaskPattern.measure(task, experts, weights, ident.num_experts, threshold, sources[task])
        log.info("task %s: %d tokens", task, len(experts))
    return Patterns(ident, {**found, GENERIC: pooled(found.values())}, threshold)
