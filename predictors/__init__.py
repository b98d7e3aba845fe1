"""Predictors: guess which experts the next MoE layers will route to, so the prefetcher can load them early.

``make_predictor(name, shape, **options)`` builds one by registry name; see base.py for the interface.
"""

from __future__ import annotations

from offload.errors import ConfigError

from .base import PREDICTORS, MoEShape, Predictor, RouteContext, register, top_candidates
from . import pregate  # noqa: F401  (registers)
from . import history, learned  # noqa: F401  (registers)


def make_predictor(name: str, shape: MoEShape, **options) -> Predictor:
    """A predictor by registry name; an unknown name lists the known ones."""
    try:
        cls = PREDICTORS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(PREDICTORS))
        raise ConfigError(f"unknown predictor {name!r}", f"use one of: none, {known}") from None
    return cls(shape, **options)


__all__ = ["MoEShape", "Predictor", "RouteContext", "PREDICTORS", "make_predictor", "register", "top_candidates"]
