"""A learned routing-path predictor: tiny MLPs from the route so far to the experts of the next layers,
on top of markov's counts.

In the spirit of ExpertFlow (He et al., 2024), which predicts a token's later experts from its
routing path: for every MoE layer l and lookahead j there is one small MLP (a few thousand
parameters) mapping

    [multi-hot of the token's experts at layers 0..l  |  multi-hot of the previous token's experts at l+j]

(zeros where the predecessor is unknown) through one ReLU layer of ``hidden`` units to one logit
per expert of layer l+j. All (l, j) MLPs are stored in a few stacked tensors and trained together;
the path weights of layers after l are masked to zero, so MLP (l, j) is exactly an MLP over
(l + 1) * E + E inputs. Inference runs the one (l, j) slice in numpy (microseconds per call).

With ``markov`` (the default since format 2) the MLP is a residual on a markov predictor with a
long context (``context`` latest layers, ``horizon`` layers ahead): the logit of expert b adds
``sum_f w_feat[l, j, f] * term_f(b)`` over the terms of markov's naive-Bayes score (the log prior,
the previous token's log ratio, one path log ratio per context layer; see ``Markov.features``).
``w_feat`` starts at 1 (plain naive Bayes) and the MLP's output weights at 0, so training starts
from markov's ranking and moves away from it only as far as held-out tokens reward. The terms a
training token sees come from a markov fit on the other folds of the training traces and updated
online over its own fold, as the test-time markov is fit on the training traces and updated online
over the test workload (``observe``); without that cross-fitting the counts would have seen the
very token they score. Training is binary cross-entropy against the multi-hot of the experts the
token used at l+j, early-stopped on the last ``val_fraction`` of each trace's tokens (later text
is the nearest thing to an unseen workload at hand).

Weights live in a safetensors file whose metadata holds the MoE shape, lookahead and hidden size
(and the markov options) as JSON under ``offload_predictor``, the markov counts as tensors beside
the MLPs'; ``scripts/train_predictor.py`` writes one. Format 1 files (MLPs only) still load.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from offload.errors import ConfigError

from .base import MoEShape, Predictor, RouteContext, prev_routes, register, shape_of
from .history import Markov, prev_token_scores, target_layers

if TYPE_CHECKING:  # training reads traces; inference in the runtime never does
    from offload.traces.format import Trace

log = logging.getLogger(__name__)

FORMAT = "offload-learned-predictor/2"
FORMATS = ("offload-learned-predictor/1", FORMAT)  # 1: MLPs only; 2: optionally on markov's counts
PREDICTOR_FILE = "predictor.safetensors"  # a learned predictor shipped beside a checkpoint
_TENSORS = ("w_path", "w_prev", "b_hidden", "w_out", "b_out")
_MARKOV_TENSORS = ("pair", "temporal", "unigram")  # saved as markov.pair, ...


class PathMLP(torch.nn.Module):
    """num_layers x lookahead one-hidden-layer MLPs, stacked, optionally on markov's terms; see the module docstring."""

    def __init__(self, shape: MoEShape, lookahead: int, hidden: int = 16, features: int = 0) -> None:
        super().__init__()
        if lookahead < 1 or hidden < 1 or features < 0:
            raise ConfigError(f"learned predictor needs lookahead >= 1 and hidden >= 1, got {lookahead}, {hidden}")
        L, E, J, H = shape.num_layers, shape.num_experts, lookahead, hidden
        self.shape, self.lookahead, self.hidden, self.features = shape, lookahead, hidden, features
        # (fan-in scaled like nn.Linear; the path fan-in differs per layer, (l + 1) * E, so use the widest)
        self.w_path = torch.nn.Parameter(torch.randn(L, J, L * E, H) / np.sqrt(L * E + E))
        self.w_prev = torch.nn.Parameter(torch.randn(L, J, E, H) / np.sqrt(L * E + E))
        self.b_hidden = torch.nn.Parameter(torch.zeros(L, J, H))
        # on markov's terms the MLP is a residual that starts at zero: training starts from markov's ranking
        self.w_out = torch.nn.Parameter(torch.zeros(L, J, H, E) if features else torch.randn(L, J, H, E) / np.sqrt(H))
        self.b_out = torch.nn.Parameter(torch.zeros(L, J, E))
        self.w_feat = torch.nn.Parameter(torch.ones(L, J, features))  # 1: markov's naive-Bayes sum
        self.markov: Markov | None = None  # the counts the terms come from (set by train or load_weights)
        sees = (torch.arange(L * E) // E)[None, :] <= torch.arange(L)[:, None]  # [L, L*E]: MLP (l, .) sees 0..l
        self.register_buffer("path_mask", sees.float()[:, None, :, None], persistent=False)  # [L, 1, L*E, 1]
        valid = torch.arange(L)[:, None] + torch.arange(1, J + 1)[None, :] < L
        self.register_buffer("valid", valid, persistent=False)  # [L, J]: (l, j) has a target layer

    def forward(self, path_hot: torch.Tensor, prev_hot: torch.Tensor,
                feats: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, L, J, E] from ``path_hot`` [N, L*E] (whole routes), ``prev_hot`` [N, L, J, E] (at l+j)
        and, with features, markov's terms ``feats`` [N, L, J, E, features]."""
        h = torch.einsum("np,ljph->nljh", path_hot, self.w_path * self.path_mask)
        h = torch.relu(h + torch.einsum("nlje,ljeh->nljh", prev_hot, self.w_prev) + self.b_hidden)
        logits = torch.einsum("nljh,ljhe->nlje", h, self.w_out) + self.b_out
        if self.features:
            logits = logits + torch.einsum("nljef,ljf->nlje", feats, self.w_feat)
        return logits

    def tensors(self) -> tuple[str, ...]:
        return _TENSORS + (("w_feat",) if self.features else ())

    def effective_params(self) -> int:
        """Parameters that matter (the MLPs with a target layer, without masked path weights)."""
        E, H, F = self.shape.num_experts, self.hidden, self.features
        return sum((l + 1) * E * H + E * H + H + H * E + E + F
                   for l in range(self.shape.num_layers) for j in range(1, self.lookahead + 1)
                   if l + j < self.shape.num_layers)

    def metadata(self) -> dict[str, Any]:
        s = self.shape
        meta = {"format": FORMAT, "num_layers": s.num_layers, "num_experts": s.num_experts, "top_k": s.top_k,
                "lookahead": self.lookahead, "hidden": self.hidden, "features": self.features,
                "inputs": "multi-hot path layers 0..l | multi-hot previous token at l+j", "activation": "relu"}
        if self.markov is not None:
            m = self.markov
            meta["markov"] = {"horizon": m.horizon, "context": m.context, "alpha": m.alpha, "tokens": m.tokens}
        return meta


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True, eq=False)
class PathData:
    """Training tensors of one or more traces."""

    path_hot: torch.Tensor  # [N, L*E]
    prev_hot: torch.Tensor  # [N, L, J, E]
    target: torch.Tensor  # [N, L, J, E]
    feats: torch.Tensor | None = None  # [N, L, J, E, F] markov's cross-fitted terms

    def __len__(self) -> int:
        return int(self.path_hot.shape[0])

    def subset(self, index: torch.Tensor) -> PathData:
        return PathData(self.path_hot[index], self.prev_hot[index], self.target[index],
                        None if self.feats is None else self.feats[index])


def _multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., k] ids (-1 = none) -> [..., num_experts] float32 multi-hot."""
    hot = np.zeros((*ids.shape[:-1], num_experts + 1), dtype=np.float32)
    np.put_along_axis(hot, np.where(ids < 0, num_experts, ids), 1.0, axis=-1)
    return hot[..., :-1]


def _check_shapes(traces: Sequence[Trace]) -> MoEShape:
    shape = shape_of(traces[0])
    for trace in traces:
        if shape_of(trace) != shape:
            raise ConfigError(f"{trace.path}: shape {shape_of(trace)} differs from {traces[0].path}'s {shape}")
    return shape


def path_data(traces: Sequence[Trace], lookahead: int) -> PathData:
    """Every token of ``traces`` as (path, predecessor, target) tensors for lookaheads 1..lookahead."""
    shape = _check_shapes(traces)
    L, E = shape.num_layers, shape.num_experts
    paths, prevs, targets = [], [], []
    later = np.minimum(np.arange(L)[:, None] + np.arange(1, lookahead + 1)[None, :], L - 1)  # [L, J] target layer
    for trace in traces:
        experts = trace.experts.astype(np.int64)
        hot = _multi_hot(experts, E)  # [N, L, E]
        prev_hot = _multi_hot(prev_routes(trace.seq, experts), E)
        paths.append(hot.reshape(len(trace), L * E))
        prevs.append(prev_hot[:, later])  # [N, L, J, E]
        targets.append(hot[:, later])
    return PathData(*(torch.from_numpy(np.concatenate(a)) for a in (paths, prevs, targets)))


def _folds(seq: np.ndarray, folds: int) -> list[np.ndarray]:
    """Token masks of the cross-fitting folds: whole sequences when there are enough, else contiguous chunks."""
    seqs = np.unique(seq)
    if len(seqs) >= folds:
        return [np.isin(seq, seqs[i::folds]) for i in range(folds)]
    index = np.arange(len(seq))
    return [(index >= len(seq) * i // folds) & (index < len(seq) * (i + 1) // folds) for i in range(folds)]


def markov_terms(traces: Sequence[Trace], lookahead: int, options: dict[str, Any], folds: int = 4) -> np.ndarray:
    """markov's terms for every token of ``traces`` (concatenated), [N, L, J, E, 2 + context], cross-fitted.

    Per fold: a markov fit on every other token, then run over the fold's tokens in order, scoring
    each after each layer and observing it when its route is complete, as the test-time markov runs.
    """
    shape = _check_shapes(traces)
    out = []
    for trace in traces:
        experts = trace.experts.astype(np.int64)
        prev = prev_routes(trace.seq, experts)
        terms = np.zeros((len(trace), shape.num_layers, lookahead, shape.num_experts,
                          2 + int(options.get("context", 3))), dtype=np.float32)
        for fold in _folds(trace.seq, min(folds, max(len(trace), 1))):
            markov = Markov(shape, **options)
            markov.observe(experts[~fold], prev[~fold])
            for t in np.flatnonzero(fold):
                for layer in range(shape.num_layers - 1):
                    f = markov.features(RouteContext(layer, experts[t:t + 1, :layer + 1], prev[t:t + 1]), lookahead)
                    terms[t, layer, :f.shape[0]] = f[:, 0]
                markov.observe(experts[t:t + 1], prev[t:t + 1])
        out.append(terms)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainConfig:
    """How to fit a :class:`PathMLP`; full-batch AdamW, keeping the weights of the best validation loss."""

    lookahead: int = 2
    hidden: int = 16           # units in each MLP's hidden layer
    steps: int = 400           # full-batch optimiser steps
    lr: float = 0.01
    weight_decay: float = 0.01  # on the MLPs (markov's term weights are not decayed)
    val_fraction: float = 0.2  # the last tokens of each trace, held out to pick the best step
    eval_every: int = 10       # steps between validation losses
    seed: int = 0
    markov: bool = True        # the MLPs as a residual on markov's terms (see the module docstring)
    context: int = 8           # markov's context layers and horizon for the terms
    horizon: int = 8
    folds: int = 4             # cross-fitting folds for the terms of training tokens

    def __post_init__(self) -> None:
        if self.lookahead < 1 or self.hidden < 1 or self.steps < 1 or self.eval_every < 1 or self.lr <= 0:
            raise ConfigError("lookahead, hidden, steps, eval_every must be >= 1 and lr > 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.context < 1 or self.horizon < 1 or self.folds < 2:
            raise ConfigError(f"markov terms need context, horizon >= 1 and folds >= 2, got {self.context}, "
                              f"{self.horizon}, {self.folds}")

    def markov_options(self) -> dict[str, Any]:
        return {"context": self.context, "horizon": self.horizon}


@dataclass
class TrainReport:
    """What training did: losses are mean BCE per (token, layer, lookahead, expert)."""

    train_tokens: int
    val_tokens: int
    params: int
    train_loss: float = float("nan")
    val_loss: float = float("nan")
    best_step: int = 0
    seconds: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train, val)


def _loss(net: PathMLP, data: PathData) -> torch.Tensor:
    logits = net(data.path_hot, data.prev_hot, data.feats)
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.target, reduction="none")
    mask = net.valid[None, :, :, None].expand_as(per)
    return per[mask].mean()


def _split(traces: Sequence[Trace], val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token indices into the concatenated traces: each trace's last tokens validate."""
    train_idx, val_idx, start = [], [], 0
    for trace in traces:
        n_val = int(round(val_fraction * len(trace)))
        train_idx.append(torch.arange(start, start + len(trace) - n_val))
        val_idx.append(torch.arange(start + len(trace) - n_val, start + len(trace)))
        start += len(trace)
    return torch.cat(train_idx), torch.cat(val_idx)


def _training_data(traces: Sequence[Trace], config: TrainConfig) -> tuple[PathData, Markov | None]:
    data = path_data(traces, config.lookahead)
    if not config.markov:
        return data, None
    terms = torch.from_numpy(markov_terms(traces, config.lookahead, config.markov_options(), config.folds))
    markov = Markov(shape_of(traces[0]), **config.markov_options())
    for trace in traces:
        markov.fit(trace)
    return PathData(data.path_hot, data.prev_hot, data.target, terms), markov


def train(traces: Sequence[Trace], config: TrainConfig = TrainConfig(),
          on_step: Callable[[int, float], None] | None = None) -> tuple[PathMLP, TrainReport]:
    """Fit a PathMLP on every token of ``traces``; ``on_step(step, train_loss)`` reports progress."""
    if not traces:
        raise ConfigError("no traces to train the learned predictor on")
    torch.manual_seed(config.seed)
    data, markov = _training_data(traces, config)
    train_ids, val_ids = _split(traces, config.val_fraction)
    train_set, val_set = data.subset(train_ids), data.subset(val_ids)
    features = 0 if data.feats is None else data.feats.shape[-1]
    net = PathMLP(shape_of(traces[0]), config.lookahead, config.hidden, features)
    net.markov = markov
    report = TrainReport(len(train_set), len(val_set), net.effective_params())
    decayed = [p for name, p in net.named_parameters() if name != "w_feat"]
    opt = torch.optim.AdamW([{"params": decayed}, {"params": [net.w_feat], "weight_decay": 0.0}], lr=config.lr,
                            weight_decay=config.weight_decay)
    best = (float("inf"), {k: v.detach().clone() for k, v in net.state_dict().items()})
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        opt.zero_grad()
        loss = _loss(net, train_set)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            with torch.no_grad():
                val = float(_loss(net, val_set)) if len(val_set) else float(_loss(net, train_set))
                report.curve.append((step, float(loss), val))
            if val < best[0]:  # keep the weights of the best validation loss (early stopping)
                best = (val, {k: v.detach().clone() for k, v in net.state_dict().items()})
                report.best_step = step
    net.load_state_dict(best[1])
    with torch.no_grad():
        report.train_loss = float(_loss(net, train_set))
        report.val_loss = float(_loss(net, val_set)) if len(val_set) else float("nan")
    report.seconds = time.perf_counter() - start
    return net, report


# ------------------------------------------------------------------------------------ files


def save_weights(net: PathMLP, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the net (and its markov counts) as safetensors with its shape (and ``extra``) in the metadata."""
    from safetensors.torch import save_file

    meta = {**net.metadata(), **(extra or {})}
    tensors = {name: getattr(net, name).detach().contiguous() for name in net.tensors()}
    tensors["w_path"] = (net.w_path * net.path_mask).detach().contiguous()  # masked weights are stored as 0
    if net.markov is not None:
        for name in _MARKOV_TENSORS:
            tensors[f"markov.{name}"] = torch.from_numpy(getattr(net.markov, name).astype(np.float32))
    save_file(tensors, str(path), metadata={"offload_predictor": json.dumps(meta)})


def _read(path: Path, hint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConfigError(f"{path}: no such learned-predictor weights file", hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("offload_predictor", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a learned-predictor safetensors file ({exc})", hint) from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise ConfigError(f"{path}: metadata lacks an {FORMAT!r} offload_predictor entry", hint)
    return meta, tensors


def _load_markov(net: PathMLP, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, hint: str) -> None:
    options = meta.get("markov")
    if options is None:
        return
    try:
        markov = Markov(net.shape, horizon=int(options["horizon"]), context=int(options["context"]),
                        alpha=float(options["alpha"]))
        markov.tokens = int(options["tokens"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: bad markov metadata ({exc!r})", hint) from None
    for name in _MARKOV_TENSORS:
        want, got = getattr(markov, name).shape, tensors.get(f"markov.{name}")
        if got is None or tuple(got.shape) != want:
            raise ConfigError(f"{path}: tensor markov.{name} has shape {None if got is None else tuple(got.shape)}, "
                              f"its metadata implies {want}", hint)
        setattr(markov, name, got.double().numpy().copy())
    net.markov = markov


def load_weights(path: str | Path, shape: MoEShape) -> PathMLP:
    """Read weights saved by :func:`save_weights`, checking they fit ``shape``; one-line ConfigErrors."""
    path = Path(path)
    hint = "train one with scripts/train_predictor.py --trace TRACE --out FILE"
    meta, tensors = _read(path, hint)
    try:
        saved = MoEShape(int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]))
        net = PathMLP(saved, int(meta["lookahead"]), int(meta["hidden"]), int(meta.get("features", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: bad offload_predictor metadata ({exc!r})", hint) from None
    if saved != shape:
        raise ConfigError(f"{path}: weights are for {saved.num_layers} layers x {saved.num_experts} experts "
                          f"top-{saved.top_k}, the model has {shape.num_layers} x {shape.num_experts} "
                          f"top-{shape.top_k}", "train a predictor on this model's traces")
    for name in net.tensors():
        want = tuple(getattr(net, name).shape)
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != want:
            raise ConfigError(f"{path}: tensor {name} has shape {got}, its metadata implies {want}", hint)
    with torch.no_grad():
        for name in net.tensors():
            getattr(net, name).copy_(tensors[name].float())
    _load_markov(net, meta, tensors, path, hint)
    if net.features and (net.markov is None or 2 + net.markov.context != net.features):
        raise ConfigError(f"{path}: {net.features} markov terms need markov counts with context {net.features - 2}",
                          hint)
    return net


# ------------------------------------------------------------------------------------ predictor


@register
class Learned(Predictor):
    """The routing-path MLPs as a predictor: ``weights=PATH`` (a safetensors file) or ``net=PathMLP``.

    Lookaheads beyond the trained one fall back to the previous token's experts. On markov's terms,
    ``observe`` updates this predictor's own copy of the markov counts online (the MLPs stay fixed);
    without them it does nothing.
    """

    name = "learned"

    @classmethod
    def from_model(cls, model: Any, shape: MoEShape, checkpoint_dir: Path, **options: Any) -> Learned:
        """Without ``weights`` or ``net``, the checkpoint folder's predictor.safetensors (tiny-moe ships one)."""
        if not {"weights", "net"} & options.keys() and (checkpoint_dir / PREDICTOR_FILE).is_file():
            options = {**options, "weights": checkpoint_dir / PREDICTOR_FILE}
        return cls(shape, **options)

    def __init__(self, shape: MoEShape, weights: str | Path | None = None, net: PathMLP | None = None) -> None:
        super().__init__(shape)
        if net is None:
            if weights is None:
                raise ConfigError("the learned predictor needs weights=PATH",
                                  "train one with scripts/train_predictor.py --trace TRACE --out FILE")
            net = load_weights(weights, shape)
        elif net.shape != shape:
            raise ConfigError(f"learned net built for {net.shape}, the model has {shape}")
        self.net = net
        self.lookahead = net.lookahead
        self.markov = copy.deepcopy(net.markov) if net.features else None  # learns online; the net's stays as trained
        E, J = shape.num_experts, net.lookahead
        masked = (net.w_path * net.path_mask).detach().numpy()
        # per-layer numpy slices: path rows of layers 0..l only, [J, (l + 1) * E, H]
        self._w_path = [np.ascontiguousarray(masked[l, :, :(l + 1) * E]) for l in range(shape.num_layers)]
        self._w_prev, self._b_hidden, self._w_out, self._b_out, self._w_feat = (
            getattr(net, name).detach().numpy().copy() for name in (*_TENSORS[1:], "w_feat"))
        self._offsets = np.arange(shape.num_layers, dtype=np.int64)[:, None] * E
        self._J = J

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The MLPs' logits were trained with binary cross-entropy: their sigmoid is the probability."""
        return 1.0 / (1.0 + np.exp(-scores))

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        if ctx.layer < 0:  # the next token, from prev alone: no path for the MLPs, markov's counts have it
            if self.markov is not None:
                return self.markov.predict(ctx, lookahead)
            return prev_token_scores(self.shape, ctx, target_layers(self.shape, ctx, lookahead))
        targets = target_layers(self.shape, ctx, lookahead)
        l, E = ctx.layer, self.shape.num_experts
        path = np.asarray(ctx.path, dtype=np.int64)
        hot = np.zeros((ctx.tokens, (l + 1) * E), dtype=np.float32)  # [tokens, (l + 1) * E]
        np.put_along_axis(hot, (path + self._offsets[:l + 1]).reshape(ctx.tokens, -1), 1.0, axis=1)
        prev_hot = _multi_hot(np.asarray(ctx.prev, dtype=np.int64)[:, targets.start:targets.stop], E)  # [T, d, E]
        out = np.empty((len(targets), ctx.tokens, E), dtype=np.float32)
        learned = min(len(targets), self._J)
        terms = self.markov.features(ctx, learned) if self.markov is not None and learned else None  # [d, T, E, F]
        for j in range(learned):
            h = hot @ self._w_path[l][j] + prev_hot[:, j] @ self._w_prev[l, j] + self._b_hidden[l, j]
            out[j] = np.maximum(h, 0) @ self._w_out[l, j] + self._b_out[l, j]
            if terms is not None:
                out[j] += terms[j] @ self._w_feat[l, j]
        if len(targets) > self._J:
            out[self._J:] = prev_token_scores(self.shape, ctx, targets)[self._J:]
        return out

    def observe(self, experts: np.ndarray, prev: np.ndarray) -> None:
        if self.markov is not None:
            self.markov.observe(experts, prev)

    def set_prior(self, prior: np.ndarray | None) -> None:
        """The task's prior replaces the log-prior term of markov's features the MLPs add to (format 2); a format-1
        net (MLPs only) has no prior term and keeps it unused."""
        super().set_prior(prior)
        if self.markov is not None:
            self.markov.set_prior(prior)


def report_dict(report: TrainReport, config: TrainConfig) -> dict[str, Any]:
    """The training report and config as JSON-ready fields (for metadata and eval.json)."""
    return {"train": asdict(config), "report": {k: v for k, v in asdict(report).items() if k != "curve"}}
