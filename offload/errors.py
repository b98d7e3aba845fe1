"""The project's exception types.

Each carries the file, tensor or option at fault and a hint a user can act on; the CLI
turns them into one line on stderr. Library code raises them and never catches them.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base class: a problem the user can fix, with a one-line message and a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CheckpointError(OffloadError):
    """A checkpoint is missing, incomplete, truncated or has tensors of the wrong shape."""


class UnsupportedModelError(OffloadError):
    """The checkpoint's architecture is dense or not one of the supported MoE families."""


class BudgetError(OffloadError):
    """An expert budget that is zero, negative, over 100% or cannot be parsed."""


class PolicyError(OffloadError):
    """An unknown eviction policy, predictor or scheduler name."""


class DeviceError(OffloadError):
    """A device was asked for that this machine does not have."""


class TraceError(OffloadError):
    """A routing-trace file that is malformed; the message names the file and line."""


class ConfigError(OffloadError):
    """An option value that makes no sense (negative token count, bad dtype name, ...)."""


class ContextError(ConfigError):
    """A request whose prompt and new tokens do not fit the context its KV cache row holds."""


class BusyError(OffloadError):
    """A request refused for now: the model is loading, the queue is at its limit, or the server is stopping."""


class NumericError(OffloadError):
    """The forward produced NaN or Inf: weights holding such values, or a compute dtype whose range they overflow."""


class OutputError(OffloadError):
    """An output could not be written (disk full, no permission, a path that exists): nothing of the user's changed."""
