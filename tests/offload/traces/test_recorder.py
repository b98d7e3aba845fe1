"""Recorded routing traces: readable by the trace reader, and the experts are those the forward pass used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import offload
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




def test_an_interrupted_recording_leaves_no_file_and_keeps_an_old_one(tiny_dir, tmp_path):
    model = offload.from_pretrained(tiny_dir("mixtral"), device="cpu")
    out = tmp_path / "trace.jsonl.gz"
    calls = 0

    def explode(layer, experts, weights):  # the model fails mid-run, after some tokens were written
        nonlocal calls
        calls += 1
        if calls == 20:
            raise KeyboardInterrupt

    model.model.route_observers.append(explode)
    with pytest.raises(KeyboardInterrupt):
        record_trace(model, [torch.tensor([[5, 17, 33, 60]])], out, max_new_tokens=8)
    assert not out.exists() and not (tmp_path / "trace.jsonl.gz.partial").exists()
    out.write_bytes(b"an earlier trace")
    calls = 0
    with pytest.raises(KeyboardInterrupt):
        record_trace(model, [torch.tensor([[5, 17, 33, 60]])], out, max_new_tokens=8)
    assert out.read_bytes() == b"an earlier trace" and list(tmp_path.iterdir()) == [out]
    model.model.route_observers.remove(explode)
    record_trace(model, [torch.tensor([[5, 17, 33, 60]])], out, max_new_tokens=3)
    assert len(read_trace(out)) == 4 + 2  # replaced only when complete
