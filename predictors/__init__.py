"""Predictors: guess which experts the next MoE layers will route to, so the prefetcher can load them early.

``make_predictor(name, shape, **options)`` builds one by registry name; see base.py for the interface.
"""

from __future__ import annotations

from offload.registry import lookup

from . import history, learned, pregate  # noqa: F401  (registers)
from .base import (
    PREDICTORS,
    MoEShape,
    Predictor,
    RouteContext,
    next_token_context,
    next_token_layers,
    register,
    step_probabilities,
    top_candidates,
)


def make_predictor(name: str, shape: MoEShape, **options) -> Predictor:
    """A predictor by registry name; an unknown name lists the known ones."""
    return lookup(PREDICTORS, name, "predictor", also=("none",))(shape, **options)


__all__ = ["MoEShape", "Predictor", "RouteContext", "PREDICTORS", "make_predictor", "next_token_context",
           "next_token_layers", "register", "step_probabilities", "top_candidates"]
