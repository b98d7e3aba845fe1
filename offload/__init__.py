"""offload: run Mixture-of-Experts LLMs with a bounded expert cache.

    import offload
    model = offload.from_pretrained("tiny-moe", expert_budget="25%")
    print(model.generate_text("def fibonacci(n):", max_new_tokens=40))
"""

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

__all__ = [
    "from_pretrained", "plan_checkpoint", "OffloadModel", "ModelSpec", "RuntimeConfig", "SamplingConfig", "BatchConfig",
    "POLICIES",
    "OffloadError", "CheckpointError", "UnsupportedModelError", "BudgetError", "PolicyError", "DeviceError",
    "ConfigError", "TraceError",
]
