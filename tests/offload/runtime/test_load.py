"""offload/runtime/load.py: from_pretrained takes a RuntimeConfig and/or overrides, OffloadModel's options
reach the sampling and batching configs, and bad options are one-line errors."""

from __future__ import annotations

import pytest
import torch

import offload
from offload.errors import ConfigError, DeviceError, PolicyError
from offload.runtime.config import RuntimeConfig
from tests.offload.checkpoint.test_plan import expect

PROMPT = torch.tensor([[5, 17, 33, 60, 8]])


def test_runtime_config_and_overrides_are_the_same_thing(tiny_dir):
    path = tiny_dir("mixtral")
    a = offload.from_pretrained(path, RuntimeConfig(device="cpu", expert_budget=2, policy="lfu"))
    b = offload.from_pretrained(path, device="cpu", expert_budget=2, policy="lfu")
    c = offload.from_pretrained(path, RuntimeConfig(device="cpu", policy="lfu"), expert_budget=2)
    assert a.runtime == b.runtime == c.runtime and a.cache.num_slots == 2
    assert torch.equal(a.generate(PROMPT, max_new_tokens=6), c.generate(PROMPT, max_new_tokens=6))


def test_unknown_override_lists_the_fields(tiny_dir):
    with pytest.raises(ConfigError, match="unknown runtime option 'budget'") as info:
        offload.from_pretrained(tiny_dir("mixtral"), budget="25%")
    assert "expert_budget" in info.value.hint


def test_options_reach_sampling_and_batching(tiny_dir):
    model = offload.from_pretrained(tiny_dir("mixtral"), device="cpu", scheduler="expert-aware", batch_size=3)
    assert model.batch_config().scheduler == "expert-aware" and model.batch_config(batch_size=2).batch_size == 2
    config = model.sampling_config(max_new_tokens=4, temperature=0.5, do_sample=True, seed=1)
    assert (config.max_new_tokens, config.temperature, config.do_sample, config.seed) == (4, 0.5, True, 1)
    assert model.sampling_config(config, top_k=3).top_k == 3  # options on top of a given config
    out = model.generate(PROMPT, sampling=config)
    assert out.shape == (1, 9) and torch.equal(out, model.generate(PROMPT, sampling=config))


def test_unknown_policy_lists_known(tiny_dir):
    err = expect(PolicyError, "unknown eviction policy 'mru'", tiny_dir("mixtral"), policy="mru")
    assert "lru" in err.hint and "lfu" in err.hint and "fifo" in err.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent(tiny_dir):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        offload.from_pretrained(tiny_dir("mixtral"), device="cuda")


def test_bad_options(tiny_dir):
    with pytest.raises(ConfigError, match="--offload-to"):
        offload.from_pretrained(tiny_dir("mixtral"), offload_to="nvme")
    with pytest.raises(ConfigError, match="unknown dtype"):
        offload.from_pretrained(tiny_dir("mixtral"), dtype="float8")
    model = offload.from_pretrained(tiny_dir("mixtral"), device="cpu")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=-1)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        model.generate_text("hello")
