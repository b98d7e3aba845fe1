"""offload/hw/perfmodel.py against predictions worked out by hand.

The hand-made model: 2 MoE layers x 4 experts, top-1 (2 expert uses per token), 1e6 bytes of dense weights read
per token (5e6 resident), experts of 1e6 parameters and 2e6 bytes. The hand-made machine: host memory 1e9 B/s,
disk 1e8 B/s, CPU 1e9 parameters/s (1 ms an expert), PCIe 1e9 B/s, a 10 us round trip, GPU memory 1e11 B/s and
1e11 parameters/s (10 us an expert); the dense bytes are 5e5 bf16 parameters, GEMVs at those rates (0.5 ms on
the CPU, 5 us on the GPU); no per-layer overhead but in that term's test.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from offload.checkpoint.plan import plan_checkpoint
from offload.errors import ConfigError
from offload.hw.calibration import Calibration
from offload.hw.perfmodel import (
    ModelSizes,
    predict,
    recommend,
    token_cost,
    uniform_miss_rate,
)
from offload.tools.plan import model_sizes, trace_miss_rate
from offload.traces.format import TraceHeader, TraceRecord, write_trace

SIZES = ModelSizes(dense_nbytes=5 * 10**6, dense_nbytes_per_token=10**6, stored_nbytes=2 * 10**6,
                   slot_nbytes=2 * 10**6, params=10**6, num_layers=3, num_moe_layers=2, num_experts=4, top_k=1,
                   hidden=100, fmt="bfloat16", cpu_fmt="bfloat16")
CAL = Calibration(host_memory_bandwidth=1e9, host_copy_bandwidth=5e8, disk_read_bandwidth=1e8,
                  cpu_gemv={"bfloat16": {1: 1e9}},
                  h2d_bandwidth=1e9, roundtrip_latency_s=1e-5, gpu_memory_bandwidth=1e11,
                  gpu_gemv={"bfloat16": {1: 1e11}}, layer_overhead_s=0.0,
                  gpu_layer_overhead_s=0.0, disk_request_s=0.0, miss_overhead_s=0.0)


@pytest.mark.parametrize("device, tier, hybrid, seconds, stall, moved", [
    # 0.5 ms dense + 0.5 hits x 1 ms + 1.5 misses x (4 ms memcpy of 2e6 bytes at 5e8 B/s + 1 ms)
    ("cpu", "ram", "off", 8.5e-3, 1.5 * 4e-3, 3e6),
    # a miss reads 2e6 bytes at 1e8 B/s (20 ms) into the slot, then computes (1 ms)
    ("cpu", "disk", "off", 0.5e-3 + 0.5e-3 + 1.5 * 21e-3, 1.5 * 20e-3, 3e6),
    # 5 us dense + 0.5 x 10 us + 1.5 x (2 ms H2D + 10 us)
    ("cuda", "ram", "off", 0.005e-3 + 0.005e-3 + 1.5 * 2.01e-3, 1.5 * 2e-3, 3e6),
    # auto: the CPU (1 ms + 10 us + 400 B of hidden states at 1e9) beats the fetch less its value
    # (2.01 ms - 0.25 x (1.0104 - 0.01) ms = 1.76 ms), and moves no expert bytes
    ("cuda", "ram", "auto", 0.01e-3 + 1.5 * 1.0104e-3, 1.5 * 1.0004e-3, 0.0),
    # disk: both ways read (20 ms), so the value of caching (0.25 x 21.0004 ms) makes the fetch the cheaper
    ("cuda", "disk", "auto", 0.01e-3 + 1.5 * 22.01e-3, 1.5 * 22e-3, 3e6),
])
def test_token_cost_matches_the_hand_computed_prediction(device, tier, hybrid, seconds, stall, moved):
    cost = token_cost(SIZES, CAL, device, tier, misses=1.5, hybrid=hybrid, reuse=0.25)
    assert cost.seconds == pytest.approx(seconds) and cost.stall_s == pytest.approx(stall)
    assert cost.bytes_moved == pytest.approx(moved) and cost.tokens_per_s == pytest.approx(1 / seconds)
    assert cost.cpu_experts == (1.5 if (device, tier, hybrid) == ("cuda", "ram", "auto") else 0.0)


def test_each_read_request_of_a_disk_miss_adds_the_calibrated_latency():
    cal = replace(CAL, disk_request_s=1e-3)
    one = token_cost(SIZES, cal, "cpu", "disk", misses=1.5)
    assert one.seconds == pytest.approx(0.5e-3 + 0.5e-3 + 1.5 * (1e-3 + 20e-3 + 1e-3))  # latency + bytes + compute
    three = token_cost(replace(SIZES, reads_per_miss=3), cal, "cpu", "disk", misses=1.5)  # a GGUF expert's 3 tensors
    assert three.seconds - one.seconds == pytest.approx(1.5 * 2e-3) and three.stall_s - one.stall_s == pytest.approx(
        1.5 * 2e-3)
    ram = [token_cost(replace(SIZES, reads_per_miss=r), cal, "cpu", "ram", misses=1.5).seconds for r in (1, 3)]
    assert ram[0] == ram[1]  # the RAM tier reads nothing


def test_every_fetched_miss_adds_the_calibrated_bookkeeping_and_a_hit_none():
    cal = replace(CAL, miss_overhead_s=1e-3)
    for tier in ("ram", "disk"):
        base, more = (token_cost(SIZES, c, "cpu", tier, misses=1.5) for c in (CAL, cal))
        assert more.seconds - base.seconds == pytest.approx(1.5e-3) and more.stall_s - base.stall_s == pytest.approx(
            1.5e-3)
        assert token_cost(SIZES, cal, "cpu", tier, misses=0.0).seconds == token_cost(SIZES, CAL, "cpu", tier,
                                                                                     misses=0.0).seconds


def test_every_decoder_layer_adds_the_calibrated_overhead():
    slow = replace(CAL, layer_overhead_s=1e-4, gpu_layer_overhead_s=2e-5)  # 3 layers: +0.3 ms, +60 us
    assert token_cost(SIZES, slow, "cpu", "ram", 0.0).seconds == pytest.approx(0.5e-3 + 2e-3 + 3e-4)
    assert token_cost(SIZES, slow, "cuda", "ram", 0.0).seconds == pytest.approx(0.005e-3 + 0.02e-3 + 6e-5)


def test_misses_beyond_the_tokens_expert_uses_are_refused():
    with pytest.raises(ConfigError, match=r"must lie in 0..2"):
        token_cost(SIZES, CAL, "cpu", "ram", misses=3)


def _trace(path, experts, phases, num_experts=4):
    header = TraceHeader("hand", len(experts[0]), num_experts, 1)
    records = [TraceRecord(0, pos, phase, tuple((e,) for e in layers), tuple((1.0,) for _ in layers))
               for pos, (layers, phase) in enumerate(zip(experts, phases))]
    write_trace(path, header, records)
    return path


def test_a_traces_decode_tokens_give_the_global_lru_miss_rate(tmp_path):
    # Decode keys (layer * 4 + expert), one global LRU cache of 2: 0 M, 6 M | 0 H, 7 M (evicts 6) |
    # 1 M (evicts 0), 6 M (evicts 7) | 0 M (evicts 1), 6 H: 6 misses and 2 hits over 4 tokens.
    # The prefill token (experts 3 and 1) is left out: with it, 3 and 5 would take the cache first.
    path = _trace(tmp_path / "t.jsonl", [(3, 1), (0, 2), (0, 3), (1, 2), (0, 2)], ["prefill"] + ["decode"] * 4)
    rate = trace_miss_rate(str(path), SIZES)
    assert rate(2) == (0.25, 1.5)
    assert rate(8) == (0.5, 1.0)  # 4 cold misses of 4 distinct keys
    with pytest.raises(ConfigError, match="recorded on 2 MoE layers x 8 experts"):
        trace_miss_rate(str(_trace(tmp_path / "u.jsonl", [(0, 7)], ["decode"], num_experts=8)), SIZES)


def test_uniform_routing_hits_in_proportion_to_the_slots():
    rate = uniform_miss_rate(SIZES)
    assert rate(4) == (0.5, 1.0) and rate(8) == (1.0, 0.0) and rate(2) == (0.25, 1.5)


def _fits_in(host: int):
    """A stand-in for the fit check: dense + slots (+ every expert in the RAM tier) within ``host`` bytes."""
    def fits(tier: str, slots: int) -> bool:
        ram_tier = SIZES.total_experts * SIZES.slot_nbytes if tier == "ram" else 0
        return SIZES.dense_nbytes + slots * SIZES.slot_nbytes + ram_tier <= host
    return fits


def test_plan_predicts_every_budget_and_recommends_the_fastest_that_fits():
    rate = uniform_miss_rate(SIZES)
    # 25e6 free bytes: the RAM tier holds all 8 experts (16e6) + 5e6 dense + its slots, so only 25% (2 slots) fits
    # there; the disk tier fits at 100% (21e6) and, missing nothing, runs at 0.5 ms + 2 x 1 ms = 2.5 ms a token.
    plan = predict(SIZES, CAL, "cpu", ("ram", "disk"), ("100%", "50%", "25%"), rate, _fits_in(25 * 10**6))
    assert [(p.tier, p.slots, p.fits) for p in plan] == [
        ("ram", 8, False), ("ram", 4, False), ("ram", 2, True), ("disk", 8, True), ("disk", 4, True), ("disk", 2, True)]
    ram25, disk100, disk50 = plan[2], plan[3], plan[4]
    assert ram25.seconds_per_token == pytest.approx(8.5e-3) and disk100.seconds_per_token == pytest.approx(2.5e-3)
    assert disk50.seconds_per_token == pytest.approx(0.5e-3 + 1e-3 + 1.0 * 21e-3)  # 1 hit, 1 miss
    assert ram25.memory_nbytes == 5 * 10**6 + 2 * 2 * 10**6
    assert ram25.to_dict()["tokens_per_s"] == pytest.approx(1e3 / 8.5)
    assert recommend(plan) == disk100
    assert recommend(plan[:2]) is None  # nothing fits


def test_the_recommendation_is_the_fewest_slots_within_five_percent_and_cuda_adds_hybrid():
    def rate(slots):  # half the experts already catch every access
        return (1.0, 0.0) if slots >= 4 else (0.5, 1.0)
    plan = predict(SIZES, CAL, "cpu", ("ram",), ("100%", "50%", "25%"), rate, _fits_in(10**9))
    assert recommend(plan).budget == "50%"
    gpu = predict(SIZES, CAL, "cuda", ("ram",), ("25%",), rate, lambda tier, slots: None)
    assert [(p.hybrid, p.fits) for p in gpu] == [("off", None), ("auto", None)]  # no GPU here: fit unknown
    assert gpu[1].cpu_experts_per_token == 1.0 and gpu[1].tokens_per_s > gpu[0].tokens_per_s


def test_sizes_from_a_checkpoint(tiny_dir):
    plan = plan_checkpoint(tiny_dir("mixtral"))
    spec, sizes = plan.spec, model_sizes(plan, "cpu")
    assert sizes.dense_nbytes == plan.dense_nbytes  # float32 on disk, float32 compute
    embed = spec.vocab_size * spec.hidden_size * 4
    assert sizes.dense_nbytes_per_token == plan.dense_nbytes - embed  # the embedding is a lookup
    assert (sizes.stored_nbytes, sizes.slot_nbytes, sizes.params) == (plan.expert_nbytes(),) * 2 + (spec.expert_params,)
    assert sizes.active == spec.num_moe_layers * spec.top_k and sizes.fmt == sizes.dense_fmt == "float32"
    half = model_sizes(plan, "cpu", torch.bfloat16)
    assert half.slot_nbytes == plan.expert_nbytes() // 2 and half.fmt == "bfloat16" and half.itemsize == 2
    assert half.dense_fmt == "bfloat16"  # the dense GEMVs run at the compute dtype's calibrated rate
    assert sizes.reads_per_miss == plan.reads_per_expert() >= 1
