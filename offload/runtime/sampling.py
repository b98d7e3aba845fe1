"""The one sampling path: a frozen SamplingConfig and ``sample()``, used by generate() and continuous batching.

The filters follow transformers' logits processors in its order (temperature, then top-k, then
top-p), so a seeded sampled run here draws from the same distribution transformers would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from offload.errors import ConfigError, NumericError

SEED_RANGE = 2**64  # what torch.Generator.manual_seed takes (as an unsigned 64-bit integer)


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen and when a sequence stops; unset fields come from generation_config.json."""

    max_new_tokens: int = 20       # tokens to generate at most
    do_sample: bool = False        # False: greedy (argmax); True: sample from the filtered distribution
    temperature: float = 1.0       # logits are divided by it before filtering (sampling only)
    top_k: int = 50                # keep the k likeliest tokens (0: off), transformers' default
    top_p: float = 1.0             # keep the smallest set of tokens whose probability reaches top_p (1: off)
    eos_token_ids: tuple[int, ...] = ()  # a sequence stops after emitting any of these
    pad_token_id: int | None = None      # fills finished rows of a batch (None: the first eos, else 0)
    seed: int | None = None              # seeds a generator when none is passed

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}",
                                  "0 disables top-k filtering" if name == "top_k" else "pass a non-negative number")
        temperature = self.temperature
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature!r}",
                              "use do_sample=False for greedy decoding")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}", "1.0 disables nucleus sampling")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < SEED_RANGE):
            raise ConfigError(f"seed must be an integer in [0, 2**64), got {self.seed!r}", "pass a smaller seed")
        object.__setattr__(self, "eos_token_ids", _eos_tuple(self.eos_token_ids))

    @classmethod
    def from_generation_config(cls, generation_config: Mapping[str, Any], model_eos: tuple[int, ...] = (),
                               model_pad: int | None = None, **overrides: Any) -> SamplingConfig:
        """Defaults from a checkpoint's generation_config.json (then the model's eos/pad), then ``overrides``.

        An override of None means "not given". ``eos_token_id`` is accepted as the transformers
        spelling of ``eos_token_ids``.
        """
        gen = dict(generation_config)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "eos_token_id" in given:
            given["eos_token_ids"] = given.pop("eos_token_id")
        fields = {"max_new_tokens": gen.get("max_new_tokens", 20), "do_sample": bool(gen.get("do_sample", False)),
                  "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
                  "top_p": float(gen.get("top_p", 1.0)),
                  "eos_token_ids": _eos_tuple(gen.get("eos_token_id")) or tuple(model_eos),
                  "pad_token_id": gen.get("pad_token_id", model_pad)}
        unknown = sorted(set(given) - set(fields) - {"seed"})
        if unknown:
            raise ConfigError(f"unknown sampling option {unknown[0]!r}",
                              f"use one of: {', '.join(sorted(fields))}, seed")
        return cls(**{**fields, **given})

    @property
    def pad(self) -> int:
        """The token that fills a finished row."""
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` (None without a seed: torch's global RNG is used)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p), in transformers' order. logits: [batch, vocab] float32."""
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        # A temperature so small that logits / temperature overflows float32 (1e-300: inf - inf = nan in the
        # softmax). Shifting by the row's max first gives the same distribution with the top token(s) at 0.
        top = logits.double().amax(dim=-1, keepdim=True)
        scaled = ((logits.double() - top) / temperature).float()
    logits = scaled
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]: argmax, or a draw from the filtered softmax."""
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):  # one pass over [batch, vocab]: nothing beside a forward
        raise NumericError("the model produced NaN or Inf logits",
                           "the checkpoint's weights may hold NaN/Inf, or the compute dtype overflows: try --dtype "
                           "float32")
    if not config.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config.temperature, config.top_k, config.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
