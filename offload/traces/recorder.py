"""Recording routing traces from the runtime: which experts each token chose at each MoE layer.

The file format is offload/traces/format.py's (offload-routing-trace/1). Layers in a trace are the
model's MoE layers in order (dense layers of Qwen2-MoE-style models route nothing); their model
indices are in the header's ``moe_layers`` field. ``pos`` is the token's absolute position in
its sequence, prompt tokens first (phase "prefill"), then generated ones (phase "decode").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from offload.traces.format import TraceHeader, TraceWriter


class RoutingRecorder:
    """A route observer that turns one sequence's forward passes into trace records."""

    def __init__(self, writer: TraceWriter, moe_layers: Sequence[int]) -> None:
        self.writer = writer
        self.moe_layers = list(moe_layers)
        self._last = self.moe_layers[-1]
        self._experts: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self.seq = 0
        self.pos = 0
        self.tokens = 0  # records written over all sequences

    def start_sequence(self, seq: int) -> None:
        self.seq, self.pos = seq, 0

    def __call__(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        self._experts.append(experts.cpu())
        self._weights.append(weights.float().cpu())
        if layer != self._last:
            return
        experts_tlk = torch.stack(self._experts, dim=1)  # [tokens, moe layers, k]
        weights_tlk = torch.stack(self._weights, dim=1)
        self._experts.clear()
        self._weights.clear()
        phase = "prefill" if self.pos == 0 else "decode"  # a sequence's first forward is its prompt
        for t in range(experts_tlk.shape[0]):
            self.writer.write(self.seq, self.pos, phase, experts_tlk[t].tolist(), weights_tlk[t].tolist())
            self.pos += 1
        self.tokens += experts_tlk.shape[0]


def record_trace(model, prompts: Iterable[str | torch.Tensor], out: str | Path, max_new_tokens: int = 32,
                 workload: str = "") -> int:
    """Generate greedily for each prompt (batch 1) and write every token's routing to ``out``; returns tokens."""
    spec = model.spec
    moe_layers = [i for i, moe in enumerate(spec.moe_layers) if moe]
    header = TraceHeader(model=model.name, num_layers=len(moe_layers), num_experts=spec.num_experts,
                         top_k=spec.top_k, extra={"moe_layers": moe_layers, "workload": workload,
                                                  "pos_is": "absolute token position in the sequence",
                                                  "recorded_by": "offload trace"})
    with TraceWriter(out, header) as writer:
        recorder = RoutingRecorder(writer, moe_layers)
        model.model.route_observers.append(recorder)
        try:
            for seq, prompt in enumerate(prompts):
                ids = model.encode(prompt) if isinstance(prompt, str) else prompt
                recorder.start_sequence(seq)
                model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        finally:
            model.model.route_observers.remove(recorder)
        return recorder.tokens
