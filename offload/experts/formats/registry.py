"""Every expert format offload reads, by config.json's ``quantization_config.quant_method``: adding a format is one
module and one line here. Float experts (no quantization_config, or one that leaves the experts in float) are
DenseFormat, chosen by the checkpoint reader from the experts' dtype.
"""

from __future__ import annotations

from offload.errors import ConfigError, UnsupportedModelError
from offload.experts.formats.base import ExpertFormat
from offload.experts.formats.compressed_tensors import CompressedTensorsFormat
from offload.experts.formats.fp8 import Fp8BlockFormat
from offload.experts.formats.gptq import GptqFormat
from offload.experts.formats.mxfp4 import Mxfp4Format

FORMATS: dict[str, type[ExpertFormat]] = {
    cls.quant_method: cls for cls in (GptqFormat, CompressedTensorsFormat, Mxfp4Format, Fp8BlockFormat)
}


def format_from_config(quantization_config: dict, where: str = "config.json") -> ExpertFormat:
    """The format a quantization_config names; anything offload cannot read is refused in one line naming
    ``where`` (the config file) and what it asked for."""
    method = str(quantization_config.get("quant_method", "")).lower()
    cls = FORMATS.get(method)
    if cls is None:
        raise UnsupportedModelError(f"{where}: quantization method {method!r} is not supported",
                                    f"offload reads {', '.join(FORMATS)} checkpoints (or float ones)")
    try:
        return cls.from_config(quantization_config)  # type: ignore[attr-defined]
    except (UnsupportedModelError, ConfigError) as e:
        raise UnsupportedModelError(f"{where}: {e.message}", e.hint) from None
