"""offload/hw/calibration.py: the calibration file's round trip and defaults, the rate interpolation the models use,
and every measurement run once at a tiny size (what they return is checked for shape and sign, never for speed:
these machines are shared, so no timing is asserted)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from offload.errors import ConfigError
from offload.experts.formats.compressed_tensors import CompressedTensorsFormat
from offload.experts.formats.dense import DenseFormat
from offload.experts.quant import QuantScheme
from offload.hw.calibration import DEFAULT_CPU_GEMV, FORMATS, VERSION, Calibration, default_path
from offload.tools.benchhw import (
    BenchSizes,
    calibrate,
    measure_copy_bandwidth,
    measure_cpu_gemv,
    measure_cuda_transfers,
    measure_disk,
    measure_gpu_gemv,
    measure_memory_bandwidth,
)

TINY = BenchSizes(memory_bytes=2**20, disk_bytes=2**20, gemv_bytes=2**16, repeats=1, gemv_repeats=1)


def test_the_default_path_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "offload" / "hardware.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / ".cache" / "offload" / "hardware.json"


def test_without_a_file_the_documented_defaults_apply(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    c = Calibration.load()
    assert c == Calibration() and c.measured == () and c.version == VERSION
    assert (c.host_memory_bandwidth, c.disk_read_bandwidth, c.h2d_bandwidth) == (20e9, 1.2e9, 25e9)
    assert c.cpu_gemv == DEFAULT_CPU_GEMV and set(c.gpu_gemv) == set(FORMATS)


def test_save_and_load_round_trip_through_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    c = Calibration(host_memory_bandwidth=3e10, disk_read_bandwidth=2e9, cpu_gemv={"bfloat16": {1: 5e9, 8: 9e9}},
                    h2d_bandwidth=12e9, roundtrip_latency_s=1e-5, shape=(64, 128), measured=("host_memory_bandwidth",),
                    machine={"cpu_model": "x", "loadavg": [1.0, 2.0, 3.0]})
    path = c.save()
    assert path == tmp_path / "offload" / "hardware.json" and not path.with_name("hardware.json.partial").exists()
    saved = json.loads(path.read_text())
    assert saved["format"] == "offload-calibration" and saved["cpu_gemv"] == {"bfloat16": {"1": 5e9, "8": 9e9}}
    assert Calibration.load() == c and Calibration.load(path) == c


def test_a_corrupt_file_is_a_one_line_error_and_another_version_falls_back(tmp_path, caplog):
    path = tmp_path / "hardware.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Calibration.load(path)
    path.write_text(json.dumps({**Calibration().to_json(), "cpu_gemv": {"bfloat16": {"one": 1}}}))
    with pytest.raises(ConfigError, match="is not a valid calibration"):
        Calibration.load(path)
    path.write_text(json.dumps({**Calibration().to_json(), "host_memory_bandwidth": -1}))
    with pytest.raises(ConfigError, match="host_memory_bandwidth must be > 0"):
        Calibration.load(path)
    path.write_text(json.dumps({**Calibration().to_json(), "layer_overhead_s": -1e-3}))
    with pytest.raises(ConfigError, match="must be >= 0"):
        Calibration.load(path)
    path.write_text(json.dumps({**Calibration().to_json(), "version": VERSION + 1, "host_memory_bandwidth": 1.0}))
    with caplog.at_level(logging.WARNING, logger="offload.hw.calibration"):
        assert Calibration.load(path) == Calibration()  # an upgrade never stops a run
    assert "using the defaults" in caplog.text


def test_expert_time_interpolates_between_measured_token_counts():
    # 1 token: 1e9 parameters/s (1 ns each); 5 tokens: 5e8/s (2 ns each); one expert of 1000 parameters
    c = Calibration(cpu_gemv={"bfloat16": {1: 1e9, 5: 5e8}})
    assert c.cpu_expert_s("bfloat16", 1000, 1) == pytest.approx(1e-6)
    assert c.cpu_expert_s("bfloat16", 1000, 3) == pytest.approx(1.5e-6)   # halfway: 1.5 ns
    assert c.cpu_expert_s("bfloat16", 1000, 9) == pytest.approx(3e-6)     # the last slope, 0.25 ns a token
    assert c.cpu_expert_s("float16", 1000, 1) == pytest.approx(1e-6)      # float16 runs at bf16's rate
    one = Calibration(cpu_gemv={"int8": {2: 1e9}})
    assert one.cpu_expert_s("int8", 1000, 1) == pytest.approx(1e-6)       # below: the smallest's
    assert one.cpu_expert_s("int8", 1000, 8) == pytest.approx(4e-6)       # above one point: linear in tokens
    with pytest.raises(ConfigError, match="no expert rate for 'int4'"):
        one.cpu_expert_s("int4", 1000, 1)  # int4 falls back to bfloat16, which this one lacks


def test_the_gemv_key_follows_the_slot_layout_each_device_computes_with():
    int4 = CompressedTensorsFormat(QuantScheme(4, 128, False))
    assert DenseFormat(torch.bfloat16).compute_key(torch.float32, "int8", "cpu") == "float32"
    assert int4.compute_key(torch.bfloat16, "int8", "cpu") == "int4"
    assert int4.compute_key(torch.bfloat16, "int16", "cpu") == "int4"
    assert int4.compute_key(torch.bfloat16, "float32", "cpu") == "float32"  # dequantize + exact matmul
    assert int4.compute_key(torch.bfloat16, "int8", "cuda") == "int4"
    # the RAM tier's host copy is in the device's slot layout: on CUDA the dequantizing one, at bf16's rate
    assert int4.host_compute_key(torch.bfloat16, "int8", "cuda") == "bfloat16"
    assert int4.host_compute_key(torch.bfloat16, "int8", "cpu") == "int4"
    assert DenseFormat(torch.bfloat16).host_compute_key(torch.float32, "int8", "cuda") == "float32"


def test_memory_and_disk_measurements_return_rates_and_leave_no_file(tmp_path):
    assert measure_memory_bandwidth(2**20, 1) > 0 and measure_copy_bandwidth(2**20, 1, chunk=2**18) > 0
    disk = measure_disk(tmp_path / "bench", 2**20, 1, chunk=2**18, requests=8)
    assert disk.bandwidth > 0 and disk.request_s > 0 and disk.mode in ("direct", "fadvise", "plain")
    assert list((tmp_path / "bench").iterdir()) == []  # the temporary file is removed


def test_cpu_gemv_measures_every_format_and_token_count():
    rates, notes = measure_cpu_gemv(64, 128, FORMATS, (1, 3), TINY)
    assert notes == [] and set(rates) == set(FORMATS)
    assert all(set(r) == {1, 3} and min(r.values()) > 0 for r in rates.values())
    rates, notes = measure_cpu_gemv(40, 72, ("int4", "float32"), (1,), TINY)  # no int4 kernel group fits 40
    assert set(rates) == {"float32"} and notes and notes[0].startswith("int4:")
    with pytest.raises(ConfigError, match="unknown expert format"):
        measure_cpu_gemv(64, 128, ("fp8",), (1,), TINY)


def test_calibrate_without_cuda_measures_the_host_and_keeps_gpu_defaults(tmp_path):
    c, notes = calibrate(64, 128, tmp_path, ("bfloat16",), (1,), TINY, cuda=False)
    assert c.measured == ("host_memory_bandwidth", "host_copy_bandwidth", "disk_read_bandwidth", "disk_request_s",
                          "layer_overhead_s", "miss_overhead_s", "cpu_gemv.bfloat16")
    assert c.miss_overhead_s >= 0
    assert c.layer_overhead_s >= 0 and c.gpu_layer_overhead_s == Calibration().gpu_layer_overhead_s
    assert c.shape == (64, 128) and c.gpu_gemv == Calibration().gpu_gemv
    assert c.cpu_gemv["int4"] == DEFAULT_CPU_GEMV["int4"] and set(c.cpu_gemv["bfloat16"]) == {1}
    assert any("no CUDA device" in n for n in notes) and c.machine["disk_read_mode"] in ("direct", "fadvise", "plain")
    assert Calibration.from_json(json.loads(json.dumps(c.to_json()))) == c


@pytest.mark.gpu
def test_cuda_measurements_return_rates():
    transfers = measure_cuda_transfers(TINY, 64)
    assert set(transfers) == {"h2d_bandwidth", "gpu_memory_bandwidth", "roundtrip_latency_s"}
    assert min(transfers.values()) > 0
    rates = measure_gpu_gemv(64, 128, FORMATS, (1, 4), TINY)
    assert set(rates) == set(FORMATS) and all(min(r.values()) > 0 for r in rates.values())
