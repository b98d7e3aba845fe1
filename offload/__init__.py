"""offload: run Mixture-of-Experts LLMs with a bounded expert cache.

    import offload
    model = offload.from_pretrained("tiny-moe", expert_budget="25%")
    print(model.generate_text("def fibonacci(n):", max_new_tokens=40))
"""

from .batch import BatchConfig
from .config import ModelSpec, RuntimeConfig
from .errors import (
                     BudgetError,
                     CheckpointError,
                     ConfigError,
                     DeviceError,
                     OffloadError,
                     PolicyError,
                     TraceError,
                     UnsupportedModelError,
)
from .policies import POLICIES
from .runtime import OffloadModel, from_pretrained, plan_checkpoint
from .sampling import SamplingConfig

__all__ = [
    "from_pretrained", "plan_checkpoint", "OffloadModel", "ModelSpec", "RuntimeConfig", "SamplingConfig", "BatchConfig",
    "POLICIES",
    "OffloadError", "CheckpointError", "UnsupportedModelError", "BudgetError", "PolicyError", "DeviceError",
    "ConfigError", "TraceError",
]
