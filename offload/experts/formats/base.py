"""The expert format interface: what a checkpoint stores per expert, and where its bytes live and compute.

A format is one class in one module, registered under its config.json ``quant_method`` in formats/registry.py
(float experts, which have none, are DenseFormat). Everything format-specific is a method here, so the checkpoint
reader, the expert storages, the tiers and the cost model ask the format and never test which one it is.

Stages of an expert's bytes (each a layout of experts/layouts.py):

* as the checkpoint stores them: ``tensor_suffixes`` / ``shapes`` / ``dtypes`` name and check the tensors of
  one projection (``fused_tensors`` those of a layer whose experts share tensors, as gpt-oss's), and
  ``source_matrix`` / ``fused_layout`` say where each matrix sits once read;
* in the RAM tier: ``host_layout`` (the slot's, unless the native bytes are smaller and cheap to convert);
* in a cache slot, where it computes: ``slot_layout``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from offload.errors import UnsupportedModelError
from offload.experts.layouts import DenseMatrix, ExpertLayout, Matrix, Part, pack_matrices, projection_shapes

if TYPE_CHECKING:
    from offload.spec import ModelSpec

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class ExpertFormat(ABC):
    """The storage format of a checkpoint's experts (and of its other projections, where it quantizes them)."""

    quant_method: ClassVar[str] = ""  # config.json's quantization_config.quant_method ("": float experts)
    checks_values: ClassVar[bool] = False  # True: check_expert reads the first expert's tensors at plan time

    @property
    @abstractmethod
    def name(self) -> str:
        """What `offload info` shows: "bfloat16", "int4-g128-asym (gptq)", ..."""

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The float dtype the experts are stored in, or None when they are quantized."""
        return None

    def layer_format(self, layer: int) -> ExpertFormat:
        """The format of one MoE layer's experts: this one, unless the file mixes formats across layers (a GGUF
        K-quant mix keeps some layers' down projections in Q6_K)."""
        return self

    # -- the checkpoint's tensors ----------------------------------------------------------------------------
    @abstractmethod
    def tensor_suffixes(self) -> tuple[str, ...]:
        """One projection's tensors, after "<projection>." (weight; qweight, qzeros, ...)."""

    @abstractmethod
    def shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Each suffix's shape for an [out, in] projection."""

    @abstractmethod
    def dtypes(self, suffix: str) -> tuple[torch.dtype, ...]:
        """The dtypes a tensor of this format may be stored as, the usual one first."""

    def stored_dtype(self, suffix: str, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor is assumed to have where only config.json is known (sizes of `offload info`)."""
        return self.dtypes(suffix)[0]

    @abstractmethod
    def source_matrix(self, parts: Sequence[Part], out_features: int, in_features: int) -> Matrix:
        """One projection as read: its tensors' places in a buffer (in ``tensor_suffixes`` order)."""

    def fused_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """A layer's tensors when its experts share them ([experts, ...] each, under ``experts.``)."""
        raise UnsupportedModelError(f"experts fused per layer are not supported in {self.name}",
                                    "offload reads fused experts in float or MXFP4")

    def fused_layout(self, parts: Sequence[Part]) -> ExpertLayout:
        """One expert's slices of ``fused_tensors``, read into a buffer, as a layout."""
        raise UnsupportedModelError(f"experts fused per layer are not supported in {self.name}")

    def check_expert(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> None:
        """Unpack one projection's tensors at plan time, so inconsistent values fail by name before a load
        (called when ``checks_values`` is set)."""

    def for_activations(self, activations: str) -> ExpertFormat:
        """This format computing with ``activations`` (--quant-activations). Formats that choose their compute in
        ``slot_layout`` return themselves; GGUF's carries the choice into every layout it makes, since a slot in the
        file's blocks is bound from the layout the disk read (checkpoint offsets), not from the slot's."""
        return self

    # -- resident projections stored in this format (GPTQ attention, FP8 everything) -----------------------
    def dense_parts(self, tensors: Mapping, name: str, shape: tuple[int, ...]) -> dict | None:
        """suffix -> (tensor name, shape, dtypes) of a resident projection stored in this format, or None when it
        is stored as a float ``name``."""
        return None

    def dense_weight(self, tensors: Mapping[str, torch.Tensor], name: str, out_features: int,
                     in_features: int) -> torch.Tensor:
        """A resident projection's float32 weight from its stored tensors (dequantized once, at load)."""
        raise UnsupportedModelError(f"resident projections are not stored in {self.name}")

    # -- where the bytes live and compute -------------------------------------------------------------------
    @abstractmethod
    def slot_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """What a cache slot holds and computes from, on ``device`` with compute dtype ``dtype``."""

    def host_layout(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                    activations: str) -> ExpertLayout:
        """What the RAM tier holds: the slot's layout, so that a RAM miss is one memcpy."""
        return self.slot_layout(spec, dtype, device, activations)

    def compute_key(self, dtype: torch.dtype, activations: str, device: str) -> str:
        """The calibration key (hw/calibration.py) a slot of this format computes at: its compute dtype's."""
        return str(dtype).removeprefix("torch.")

    def host_compute_key(self, dtype: torch.dtype, activations: str, device: str) -> str:
        """The key the RAM tier's copy computes at on the CPU (hybrid's CPU side): the host layout's rate."""
        return self.compute_key(dtype, activations, "cpu")


def dequantized_slot(native: ExpertLayout, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                     bias: bool) -> ExpertLayout:
    """The slot of a vendor format (MXFP4, FP8 blocks), for which torch has no CPU kernel.

    Measured here (scripts/results/bench_quant.json, one token through a 3584x1024 matrix, 1 thread):
    dequantize-then-matmul costs 2.4 ms in MXFP4 and 4-17 ms in FP8 against 0.21 ms for a bf16 matmul,
    so on CPU a miss dequantizes once into a dense slot of the compute dtype (the RAM tier keeps the
    native bytes) and every hit runs at bf16's rate; the slot is 3.8x (MXFP4) / 2x (FP8) larger, which
    the budget counts. On a GPU, memory is the scarce side and dequantizing per matmul is cheap there,
    so the slot stays native.
    """
    if device.type != "cpu":
        return native
    return pack_matrices([DenseMatrix(Part(0, dtype, (out, inn)), Part(0, dtype, (out,)) if bias else None)
                          for out, inn in projection_shapes(spec)])
