"""offload: run Mixture-of-Experts LLMs with a bounded expert cache.

    import offload
    model = offload.from_pretrained("tiny-moe", expert_budget="25%")
    print(model.generate_text("def fibonacci(n):", max_new_tokens=40))

The names below load on first use (PEP 562), so importing a light module such as ``offload.errors`` (as the
CLI does before it parses its arguments: ``offload --help`` answers without importing torch) does not pull in
the runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from offload.version import __version__

if TYPE_CHECKING:
    from offload.errors import (
        BudgetError,
        CheckpointError,
        ConfigError,
        DeviceError,
        OffloadError,
        PolicyError,
        TraceError,
        UnsupportedModelError,
    )
    from offload.memory.policies import POLICIES
    from offload.runtime.batch import BatchConfig
    from offload.runtime.config import RuntimeConfig
    from offload.runtime.load import OffloadModel, from_pretrained, plan_checkpoint
    from offload.runtime.sampling import SamplingConfig
    from offload.spec import ModelSpec

_HOMES = {  # public name -> the module that defines it
    **dict.fromkeys(("OffloadError", "CheckpointError", "UnsupportedModelError", "BudgetError", "PolicyError",
                     "DeviceError", "ConfigError", "TraceError"), "offload.errors"),
    "POLICIES": "offload.memory.policies", "BatchConfig": "offload.runtime.batch",
    "RuntimeConfig": "offload.runtime.config", "SamplingConfig": "offload.runtime.sampling",
    "ModelSpec": "offload.spec",
    **dict.fromkeys(("OffloadModel", "from_pretrained", "plan_checkpoint"), "offload.runtime.load"),
}

__all__ = [
    "from_pretrained", "plan_checkpoint", "OffloadModel", "ModelSpec", "RuntimeConfig", "SamplingConfig", "BatchConfig",
    "POLICIES",
    "OffloadError", "CheckpointError", "UnsupportedModelError", "BudgetError", "PolicyError", "DeviceError",
    "ConfigError", "TraceError", "__version__",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
