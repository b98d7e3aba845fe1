"""Recorded routing traces: readable by the trace reader, and the experts are those the forward pass used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.traces.format import read_trace
from offload.traces.recorder import record_trace


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_recorded_experts_equal_transformers_routing(tiny_dir, tmp_path, family):
    import transformers

    path = tiny_dir(family)
    model = offload.from_pretrained(path, device="cpu", expert_budget=1)
    prompts = [torch.tensor([[5, 17, 33, 60]]), torch.tensor([[9, 8, 7]])]
    out = tmp_path / "trace.jsonl.gz"
    tokens = record_trace(model, prompts, out, max_new_tokens=5)
    trace = read_trace(out)
    moe_layers = [i for i, moe in enumerate(model.spec.moe_layers) if moe]
    assert len(trace) == tokens == (4 + 4) + (3 + 4)  # prompt tokens + fed-back generated tokens
    assert trace.header.num_layers == len(moe_layers) and trace.header.extra["moe_layers"] == moe_layers
    assert trace.phase.tolist()[:5] == [0, 0, 0, 0, 1] and trace.pos.tolist()[:8] == list(range(8))

    # Replay each sequence in transformers and take its routers' top-k: the ids must be the same.
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    full = model.generate(prompts[0], max_new_tokens=5)[:, :-1]  # the last token is never fed back
    with torch.no_grad():
        router_logits = ref(full, output_router_logits=True).router_logits
    k = model.spec.top_k
    expected = np.stack([logits.topk(k, dim=-1).indices.numpy() for logits in router_logits], axis=1)
    assert np.array_equal(trace.experts[: full.shape[1]], expected)
    weights = trace.weights[: full.shape[1]]
    assert np.all(weights[..., 0] >= weights[..., -1])


