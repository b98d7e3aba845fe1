"""A learned routing-path predictor: tiny MLPs from the route so far to the experts of the next layers.

In the spirit of ExpertFlow (He et al., 2024), which predicts a token's later experts from its
routing path: for every MoE layer l and lookahead j there is one small MLP (a few thousand
parameters) mapping

    [multi-hot of the token's experts at layers 0..l  |  multi-hot of the previous token's experts at l+j]

(zeros where the predecessor is unknown) through one ReLU layer of ``hidden`` units to one logit
per expert of layer l+j. Training is binary cross-entropy against the multi-hot of the experts the
token used at l+j. All (l, j) MLPs are stored in a few stacked tensors and trained together; the
path weights of layers after l are masked to zero, so MLP (l, j) is exactly an MLP over
(l + 1) * E + E inputs. Inference runs the one (l, j) slice in numpy (microseconds per call).

Weights live in a safetensors file whose metadata holds the MoE shape, lookahead and hidden size
as JSON under ``offload_predictor``; ``scripts/train_predictor.py`` writes one.
"""

from __future__ import annotations

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
from .history import prev_token_scores, target_layers

if TYPE_CHECKING:  # training reads traces; inference in the runtime never does
    from offload.traces.format import Trace

log = logging.getLogger(__name__)

FORMAT = "offload-learned-predictor/1"
PREDICTOR_FILE = "predictor.safetensors"  # a learned predictor shipped beside a checkpoint
_TENSORS = ("w_path", "w_prev", "b_hidden", "w_out", "b_out")


class PathMLP(torch.nn.Module):
    """num_layers x lookahead one-hidden-layer MLPs, stacked; see the module docstring."""

    def __init__(self, shape: MoEShape, lookahead: int, hidden: int = 16) -> None:
        super().__init__()
        if lookahead < 1 or hidden < 1:
            raise ConfigError(f"learned predictor needs lookahead >= 1 and hidden >= 1, got {lookahead}, {hidden}")
        L, E, J, H = shape.num_layers, shape.num_experts, lookahead, hidden
        self.shape, self.lookahead, self.hidden = shape, lookahead, hidden
        # (fan-in scaled like nn.Linear; the path fan-in differs per layer, (l + 1) * E, so use the widest)
        self.w_path = torch.nn.Parameter(torch.randn(L, J, L * E, H) / np.sqrt(L * E + E))
        self.w_prev = torch.nn.Parameter(torch.randn(L, J, E, H) / np.sqrt(L * E + E))
        self.b_hidden = torch.nn.Parameter(torch.zeros(L, J, H))
        self.w_out = torch.nn.Parameter(torch.randn(L, J, H, E) / np.sqrt(H))
        self.b_out = torch.nn.Parameter(torch.zeros(L, J, E))
        sees = (torch.arange(L * E) // E)[None, :] <= torch.arange(L)[:, None]  # [L, L*E]: MLP (l, .) sees 0..l
        self.register_buffer("path_mask", sees.float()[:, None, :, None], persistent=False)  # [L, 1, L*E, 1]
        valid = torch.arange(L)[:, None] + torch.arange(1, J + 1)[None, :] < L
        self.register_buffer("valid", valid, persistent=False)  # [L, J]: (l, j) has a target layer

    def forward(self, path_hot: torch.Tensor, prev_hot: torch.Tensor) -> torch.Tensor:
        """Logits [N, L, J, E] from ``path_hot`` [N, L*E] (whole routes) and ``prev_hot`` [N, L, J, E] (at l+j)."""
        h = torch.einsum("np,ljph->nljh", path_hot, self.w_path * self.path_mask)
        h = torch.relu(h + torch.einsum("nlje,ljeh->nljh", prev_hot, self.w_prev) + self.b_hidden)
        return torch.einsum("nljh,ljhe->nlje", h, self.w_out) + self.b_out

    def effective_params(self) -> int:
        """Parameters that matter (the MLPs with a target layer, without masked path weights)."""
        E, H = self.shape.num_experts, self.hidden
        return sum((l + 1) * E * H + E * H + H + H * E + E
                   for l in range(self.shape.num_layers) for j in range(1, self.lookahead + 1)
                   if l + j < self.shape.num_layers)

    def metadata(self) -> dict[str, Any]:
        s = self.shape
        return {"format": FORMAT, "num_layers": s.num_layers, "num_experts": s.num_experts, "top_k": s.top_k,
                "lookahead": self.lookahead, "hidden": self.hidden,
                "inputs": "multi-hot path layers 0..l | multi-hot previous token at l+j", "activation": "relu"}


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True, eq=False)
class PathData:
    """Training tensors of one or more traces."""

    path_hot: torch.Tensor  # [N, L*E]
    prev_hot: torch.Tensor  # [N, L, J, E]
    target: torch.Tensor  # [N, L, J, E]

    def __len__(self) -> int:
        return int(self.path_hot.shape[0])

    def subset(self, index: torch.Tensor) -> PathData:
        return PathData(self.path_hot[index], self.prev_hot[index], self.target[index])


def _multi_hot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., k] ids (-1 = none) -> [..., num_experts] float32 multi-hot."""
    hot = np.zeros((*ids.shape[:-1], num_experts + 1), dtype=np.float32)
    np.put_along_axis(hot, np.where(ids < 0, num_experts, ids), 1.0, axis=-1)
    return hot[..., :-1]


def path_data(traces: Sequence[Trace], lookahead: int) -> PathData:
    """Every token of ``traces`` as (path, predecessor, target) tensors for lookaheads 1..lookahead."""
    shape = shape_of(traces[0])
    L, E = shape.num_layers, shape.num_experts
    paths, prevs, targets = [], [], []
    later = np.minimum(np.arange(L)[:, None] + np.arange(1, lookahead + 1)[None, :], L - 1)  # [L, J] target layer
    for trace in traces:
        if shape_of(trace) != shape:
            raise ConfigError(f"{trace.path}: shape {shape_of(trace)} differs from {traces[0].path}'s {shape}")
        experts = trace.experts.astype(np.int64)
        hot = _multi_hot(experts, E)  # [N, L, E]
        prev_hot = _multi_hot(prev_routes(trace.seq, experts), E)
        paths.append(hot.reshape(len(trace), L * E))
        prevs.append(prev_hot[:, later])  # [N, L, J, E]
        targets.append(hot[:, later])
    return PathData(*(torch.from_numpy(np.concatenate(a)) for a in (paths, prevs, targets)))


# ------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainConfig:
    """How to fit a :class:`PathMLP`; full-batch AdamW, keeping the weights of the best validation loss."""

    lookahead: int = 2
    hidden: int = 32           # units in each MLP's hidden layer
    steps: int = 600           # full-batch optimiser steps
    lr: float = 0.01
    weight_decay: float = 0.01
    val_fraction: float = 0.1  # tokens held out (seeded random choice) to pick the best step
    eval_every: int = 10       # steps between validation losses
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lookahead < 1 or self.hidden < 1 or self.steps < 1 or self.eval_every < 1 or self.lr <= 0:
            raise ConfigError("lookahead, hidden, steps, eval_every must be >= 1 and lr > 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")


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
    logits = net(data.path_hot, data.prev_hot)
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.target, reduction="none")
    mask = net.valid[None, :, :, None].expand_as(per)
    return per[mask].mean()


def train(traces: Sequence[Trace], config: TrainConfig = TrainConfig(),
          on_step: Callable[[int, float], None] | None = None) -> tuple[PathMLP, TrainReport]:
    """Fit a PathMLP on every token of ``traces``; ``on_step(step, train_loss)`` reports progress."""
    if not traces:
        raise ConfigError("no traces to train the learned predictor on")
    torch.manual_seed(config.seed)
    data = path_data(traces, config.lookahead)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    n_val = int(round(config.val_fraction * len(data)))
    train_set, val_set = data.subset(order[n_val:]), data.subset(order[:n_val])
    net = PathMLP(shape_of(traces[0]), config.lookahead, config.hidden)
    report = TrainReport(len(train_set), len(val_set), net.effective_params())
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
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
    """Write the net as safetensors with its shape (and ``extra``, e.g. the training report) in the metadata."""
    from safetensors.torch import save_file

    meta = {**net.metadata(), **(extra or {})}
    tensors = {name: getattr(net, name).detach().contiguous() for name in _TENSORS}
    tensors["w_path"] = (net.w_path * net.path_mask).detach().contiguous()  # masked weights are stored as 0
    save_file(tensors, str(path), metadata={"offload_predictor": json.dumps(meta)})


def load_weights(path: str | Path, shape: MoEShape) -> PathMLP:
    """Read weights saved by :func:`save_weights`, checking they fit ``shape``; one-line ConfigErrors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    hint = "train one with scripts/train_predictor.py --trace TRACE --out FILE"
    if not path.is_file():
        raise ConfigError(f"{path}: no such learned-predictor weights file", hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("offload_predictor", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a learned-predictor safetensors file ({exc})", hint) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: metadata lacks an {FORMAT!r} offload_predictor entry", hint)
    try:
        saved = MoEShape(int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]))
        net = PathMLP(saved, int(meta["lookahead"]), int(meta["hidden"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: bad offload_predictor metadata ({exc!r})", hint) from None
    if saved != shape:
        raise ConfigError(f"{path}: weights are for {saved.num_layers} layers x {saved.num_experts} experts "
                          f"top-{saved.top_k}, the model has {shape.num_layers} x {shape.num_experts} "
                          f"top-{shape.top_k}", "train a predictor on this model's traces")
    for name in _TENSORS:
        want = tuple(getattr(net, name).shape)
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != want:
            raise ConfigError(f"{path}: tensor {name} has shape {got}, its metadata implies {want}", hint)
    with torch.no_grad():
        for name in _TENSORS:
            getattr(net, name).copy_(tensors[name].float())
    return net


# ------------------------------------------------------------------------------------ predictor


@register
class Learned(Predictor):
    """The routing-path MLPs as a predictor: ``weights=PATH`` (a safetensors file) or ``net=PathMLP``.

    Lookaheads beyond the trained one fall back to the previous token's experts. ``observe`` does
    nothing: the weights are fixed after training.
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
        E, J = shape.num_experts, net.lookahead
        masked = (net.w_path * net.path_mask).detach().numpy()
        # per-layer numpy slices: path rows of layers 0..l only, [J, (l + 1) * E, H]
        self._w_path = [np.ascontiguousarray(masked[l, :, :(l + 1) * E]) for l in range(shape.num_layers)]
        self._w_prev, self._b_hidden, self._w_out, self._b_out = (
            getattr(net, name).detach().numpy().copy() for name in _TENSORS[1:])
        self._offsets = np.arange(shape.num_layers, dtype=np.int64)[:, None] * E
        self._J = J

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The MLPs' logits were trained with binary cross-entropy: their sigmoid is the probability."""
        return 1.0 / (1.0 + np.exp(-scores))

    def predict(self, ctx: RouteContext, lookahead: int) -> np.ndarray:
        targets = target_layers(self.shape, ctx, lookahead)
        l, E = ctx.layer, self.shape.num_experts
        path = np.asarray(ctx.path, dtype=np.int64)
        hot = np.zeros((ctx.tokens, (l + 1) * E), dtype=np.float32)  # [tokens, (l + 1) * E]
        np.put_along_axis(hot, (path + self._offsets[:l + 1]).reshape(ctx.tokens, -1), 1.0, axis=1)
        prev_hot = _multi_hot(np.asarray(ctx.prev, dtype=np.int64)[:, targets.start:targets.stop], E)  # [T, d, E]
        out = np.empty((len(targets), ctx.tokens, E), dtype=np.float32)
        for j in range(min(len(targets), self._J)):
            h = hot @ self._w_path[l][j] + prev_hot[:, j] @ self._w_prev[l, j] + self._b_hidden[l, j]
            out[j] = np.maximum(h, 0) @ self._w_out[l, j] + self._b_out[l, j]
        if len(targets) > self._J:
            out[self._J:] = prev_token_scores(self.shape, ctx, targets)[self._J:]
        return out


def report_dict(report: TrainReport, config: TrainConfig) -> dict[str, Any]:
    """The training report and config as JSON-ready fields (for metadata and eval.json)."""
    return {"train": asdict(config), "report": {k: v for k, v in asdict(report).items() if k != "curve"}}
