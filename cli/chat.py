"""`offload chat`: an interactive terminal chat (placeholder until written)."""

from __future__ import annotations


def chat() -> None:
    """Chat with a model in the terminal."""
