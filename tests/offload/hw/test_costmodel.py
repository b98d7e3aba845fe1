"""offload/hw/costmodel.py: the per-miss choice on hand-made costs, worked out by hand in each test, and its counters.

The expert of these tests has 1e6 parameters, 2e6 bytes in a slot and hidden size 100 (bf16 activations). The GPU
computes 1e11 parameters/s (10 us for it at any batch here), the CPU 1e9 at one token (1 ms), and the round trip
of the hidden states costs 10 us plus 2 * tokens * 100 * 2 bytes over PCIe.
"""

from __future__ import annotations

import pytest
import torch

from offload.checkpoint.plan import plan_checkpoint
from offload.errors import ConfigError
from offload.hw.calibration import Calibration
from offload.hw.costmodel import HYBRID_MODES, ExpertCostModel, MissCosts, check_mode, decide
from offload.memory.hostcompute import expert_cost_model
from offload.stats import HybridStats


def costs(h2d: float = 1e9, cpu_rate: float = 1e9, device: str = "cuda", tier: str = "ram",
          disk: float = 1e9) -> ExpertCostModel:
    c = Calibration(h2d_bandwidth=h2d, disk_read_bandwidth=disk, roundtrip_latency_s=1e-5, disk_request_s=0.0,
                    host_memory_bandwidth=4e9, host_copy_bandwidth=2e9,
                    cpu_gemv={"bfloat16": {1: cpu_rate, 16: cpu_rate / 10}},
                    gpu_gemv={"bfloat16": {1: 1e11, 64: 1e11}})
    return ExpertCostModel(c, device, tier, params=10**6, slot_nbytes=2 * 10**6, stored_nbytes=2 * 10**6,
                           gpu_format="bfloat16", cpu_format="bfloat16", hidden=100)


def test_a_single_token_goes_to_the_cpu_when_pcie_is_slow():
    m = costs(h2d=1e9)  # fetch: 2 ms copy + 10 us; cpu: 1 ms + 10 us + 400 B / 1 GB/s
    assert m.fetch_s(1) == pytest.approx(2.01e-3) and m.cpu_s(1) == pytest.approx(1.0104e-3)
    assert m.decide("auto", tokens=1) == "cpu"
    assert costs(h2d=1e11).decide("auto", tokens=1) == "fetch"  # 20 us + 10 us beats 1 ms


def test_large_batches_fetch():
    m = costs(h2d=1e9)
    # 16 tokens: the CPU takes 10 ms (1e8 parameters/s), the fetch still 2.01 ms
    assert m.cpu_s(16) == pytest.approx(1e-2 + 1e-5 + 6400 / 1e9) and m.decide("auto", tokens=16) == "fetch"
    # a prefill-sized batch fetches whatever the costs say
    cheap_cpu = MissCosts(fetch_s=1.0, cpu_s=0.1, value_s=0.0)
    assert decide("auto", cheap_cpu, tokens=31) == "cpu" and decide("auto", cheap_cpu, tokens=32) == "fetch"


def test_the_value_of_caching_flips_a_close_case():
    m = costs(h2d=1e9, cpu_rate=1e6 / 1.9e-3)  # cpu(1) = 1.9 ms + 10.4 us, fetch(1) = 2.01 ms: the CPU, narrowly
    assert m.decide("auto", tokens=1, reuse=0.0) == "cpu"
    c = m.costs(1, reuse=0.5)  # value = 0.5 * (min(2.01, 1.9104) - 0.01) ms = 0.9502 ms
    assert c.value_s == pytest.approx(0.5 * (1.9104e-3 - 1e-5))
    assert m.decide("auto", tokens=1, reuse=0.5) == "fetch"  # 2.01 - 0.95 <= 1.91
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        m.costs(1, reuse=1.5)


def test_off_always_and_a_host_copy_that_cannot_compute():
    m = costs(h2d=1e9)
    assert m.decide("off", tokens=1) == "fetch"
    assert costs(h2d=1e11).decide("always", tokens=64) == "cpu"
    assert m.decide("always", tokens=1, host_can_compute=False) == "fetch"
    assert m.decide("auto", tokens=1, host_can_compute=False) == "fetch"
    assert check_mode("auto") == "auto" and HYBRID_MODES == ("off", "auto", "always")
    with pytest.raises(ConfigError, match="invalid --hybrid 'sometimes'"):
        decide("sometimes", MissCosts(1, 1, 0), 1)


def test_the_disk_tier_reads_either_way_and_a_cpu_device_is_the_degenerate_case():
    disk = costs(h2d=1e9, tier="disk", disk=2e9)  # + 1 ms of disk read on both sides
    assert disk.fetch_s(1) == pytest.approx(3.01e-3) and disk.cpu_s(1) == pytest.approx(2.0104e-3)
    ram = costs(device="cpu", tier="ram")  # a fetch is one thread's memcpy into a host slot: 2e6 / 2e9 = 1 ms
    assert ram.fetch_s(1) == pytest.approx(2e-3) and ram.cpu_s(1) == pytest.approx(1e-3)
    assert ram.decide("auto", 1, reuse=1.0) == "cpu"  # caching buys nothing the host copy does not already give
    on_disk = costs(device="cpu", tier="disk")  # the read lands in the slot: both ways cost the same
    assert on_disk.fetch_s(1) == on_disk.cpu_s(1) and on_disk.decide("auto", 1) == "fetch"
    with pytest.raises(ConfigError, match="no cost model"):
        costs(device="mps")


def test_from_plan_reads_the_checkpoints_sizes(tiny_dir):
    plan = plan_checkpoint(tiny_dir("mixtral", torch.bfloat16))
    m = expert_cost_model(plan, Calibration(), "cuda", "ram", torch.bfloat16)
    spec = plan.spec
    assert (m.params, m.hidden, m.activation_itemsize) == (spec.expert_params, spec.hidden_size, 2)
    assert m.slot_nbytes == m.stored_nbytes == spec.expert_params * 2
    assert (m.gpu_format, m.cpu_format) == ("bfloat16", "bfloat16")


def test_stats_count_choices_and_the_bytes_kept_off_the_bus():
    s = HybridStats()
    s.record("fetch", 100, tokens=3)
    s.record("cpu", 100, tokens=2, seconds=0.5)
    s.record("cpu", 100, tokens=1, seconds=0.25)
    total = HybridStats(fetched=1)
    total.add(s)
    assert total.to_dict() == {"cpu_experts": 2, "cpu_tokens": 3, "fetched": 2, "bytes_not_moved": 200,
                               "cpu_time_s": 0.75}
    with pytest.raises(ValueError, match="choice must be one of"):
        s.record("gpu", 1, 1)


@pytest.mark.parametrize("mode", ["always", "auto"])
def test_the_cpu_branch_on_a_cpu_device_equals_the_normal_path(tiny_dir, mode):
    """A device that is the host is the degenerate case: host copies computed in place give the same tokens."""
    import offload

    path = tiny_dir("mixtral")
    prompt = torch.tensor([[5, 17, 33, 60, 8]])
    plain = offload.from_pretrained(path, device="cpu", expert_budget=2, offload_to="ram")
    hybrid = offload.from_pretrained(path, device="cpu", expert_budget=2, offload_to="ram", hybrid=mode)
    assert torch.equal(hybrid.generate(prompt, max_new_tokens=8), plain.generate(prompt, max_new_tokens=8))
    h = hybrid.stats.hybrid
    assert h.cpu_experts > 0 and h.bytes_not_moved == h.cpu_experts * hybrid.cache.slot_nbytes
    assert hybrid.stats.total.misses < plain.stats.total.misses  # what ran on the host never entered the cache
    assert hybrid.stats.to_dict()["hybrid"]["cpu_experts"] == h.cpu_experts


def test_the_disk_tier_has_no_host_copy_to_compute(tiny_dir):
    import offload

    model = offload.from_pretrained(tiny_dir("mixtral"), device="cpu", expert_budget=2, offload_to="disk",
                                    hybrid="always")
    model.generate(torch.tensor([[5, 17, 33]]), max_new_tokens=4)
    assert model.stats.hybrid.cpu_experts == 0 and model.stats.hybrid.fetched == model.stats.total.misses
