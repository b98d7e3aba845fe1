"""offload/errors.py: every error is one line with its hint, and each kind is an OffloadError."""

from __future__ import annotations

import pytest

from offload import errors


@pytest.mark.parametrize("cls", [errors.CheckpointError, errors.UnsupportedModelError, errors.BudgetError,
                                 errors.PolicyError, errors.DeviceError, errors.TraceError, errors.ConfigError])
def test_message_and_hint(cls):
    e = cls("tensor 'x' is missing", "re-download it")
    assert isinstance(e, errors.OffloadError) and str(e) == "tensor 'x' is missing (re-download it)"
    assert (e.message, e.hint) == ("tensor 'x' is missing", "re-download it") and str(cls("plain")) == "plain"
