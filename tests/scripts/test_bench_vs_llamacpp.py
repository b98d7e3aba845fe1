"""scripts/bench_vs_llamacpp.py's own logic, without building, importing or running llama.cpp.

GGUF and quantized-copy paths cached by the checkpoint's hash, the cgroup limit arithmetic and a memory cgroup
driven on a plain folder, /proc/PID/io parsing, the summary and Markdown table from hand-made samples, the
one-line message when llama_cpp is missing, and the triad's arithmetic on a small array.
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from tests.scripts import load_script

vs = load_script("bench_vs_llamacpp")
timing = load_script("timing")


# -- caching by checkpoint hash ------------------------------------------------------------------
def _checkpoint(path, weights: bytes = b"\x00" * 64):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "mixtral"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / ".cache").mkdir()
    (path / ".cache" / "ignored").write_text("not part of the checkpoint")
    return path


def test_equal_checkpoints_share_their_ggufs_and_a_changed_byte_does_not(tmp_path) -> None:
    memo = tmp_path / "hashes.json"
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    c = _checkpoint(tmp_path / "c", b"\x00" * 63 + b"\x01")
    ha, hb, hc = (vs.checkpoint_hash(p, memo) for p in (a, b, c))
    assert ha == hb != hc and len(ha) == 64
    assert vs.gguf_path(tmp_path, ha, "q4_0") == vs.gguf_path(tmp_path, hb, "q4_0") == tmp_path / "gguf" / (
        f"{ha[:16]}-q4_0.gguf")
    assert vs.gguf_path(tmp_path, ha, "q4_0") != vs.gguf_path(tmp_path, hc, "q4_0")
    assert vs.gguf_path(tmp_path, ha, "q4_0", "all").name == f"{ha[:16]}-q4_0-all.gguf"
    assert vs.gguf_path(tmp_path, ha, "f16", "all") == vs.gguf_path(tmp_path, ha, "f16")  # f16 has no mixture
    assert vs.offload_path(tmp_path, a, ha, "bf16") == a  # bf16 is the checkpoint itself
    assert vs.offload_path(tmp_path, a, ha, "int4") == tmp_path / "quantized" / f"{ha[:16]}@int4-g128-asym"
    assert [p.name for p in vs.checkpoint_files(a)] == ["config.json", "model.safetensors"]


def test_the_hash_is_memoised_by_names_sizes_and_mtimes(tmp_path) -> None:
    memo = tmp_path / "hashes.json"
    a = _checkpoint(tmp_path / "a")
    real = vs.checkpoint_hash(a, memo)
    (key,) = json.loads(memo.read_text())
    memo.write_text(json.dumps({key: "f" * 64}))  # a memo hit is returned without reading the files
    assert vs.checkpoint_hash(a, memo) == "f" * 64
    st = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: read again
    assert vs.checkpoint_hash(a, memo) == real


# -- weights and caps ----------------------------------------------------------------------------
def test_weight_split_counts_top_k_of_the_experts_and_no_embedding_table() -> None:
    sizes = {"model.embed_tokens.weight": 1000, "lm_head.weight": 1000, "model.layers.0.self_attn.q_proj.weight": 40,
             **{f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight": 100 for e in range(8)}}
    split = vs.weight_split(sizes, top_k=2, experts=8)
    assert split == {"expert_bytes": 800, "dense_bytes": 2040, "embedding_bytes": 1000,
                     "active_bytes_per_token": 1040 + 200}
    gguf = {"token_embd.weight": 1000, "output.weight": 1000, "blk.0.attn_q.weight": 40,
            "blk.0.ffn_gate_exps.weight": 800}  # llama.cpp stacks a layer's experts in one tensor
    assert vs.weight_split(gguf, 2, 8) == split


def test_cap_arithmetic_gives_every_engine_its_share() -> None:
    config = {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 8, "num_key_value_heads": 4}
    assert vs.context_length(32, 64) == 256 and vs.context_length(200, 57) == 512
    assert vs.kv_cache_bytes(config, 256) == 2 * 8 * 4 * 64 * 256 * 2  # K and V, 16-bit
    cap = vs.Cap(pct=25, expert_bytes=1000, dense_bytes=300, kv_bytes=20, runtime_bytes=500)
    assert cap.limit_bytes == 250 + 300 + 20 + 500
    assert vs.offload_budget(cap.limit_bytes, usage=400, dense=300, kv=20, margin=50) == 1070 - 400 - 300 - 20 - 50
    with pytest.raises(vs.ConfigError, match="leaves no room for experts"):
        vs.offload_budget(1000, usage=600, dense=300, kv=20, margin=80)
    assert cap.accelerate_max_memory == 250 + 300  # the weights it may keep in RAM
    d = cap.to_dict()
    assert d["formula"] == vs.CAP_FORMULA and d["limit_bytes"] == 1070 and d["pct"] == 25
    row = vs.row_cap(50, [{"expert_bytes": 1000, "dense_bytes": 310}, {"expert_bytes": 1063, "dense_bytes": 300}],
                     20, 500)
    assert (row.expert_bytes, row.dense_bytes, row.limit_bytes) == (1063, 310, 531 + 310 + 20 + 500)


def test_runs_and_their_pairs_and_targets() -> None:
    runs = vs.plan_runs(["bf16", "int4"], [50, 25], ["bf16"])
    assert [r.name for r in runs] == [
        "offload-bf16", "llama.cpp-f16", "offload-int4", "llama.cpp-q4_0",
        "offload-disk-bf16@cap50", "llama.cpp-f16@cap50", "accelerate-bf16@cap50",
        "offload-disk-bf16@cap25", "llama.cpp-f16@cap25", "accelerate-bf16@cap25"]
    pairs = [(a.name, b.name, t) for a, b, t in vs.ratio_pairs(runs)]
    assert pairs[0] == ("offload-bf16", "llama.cpp-f16", ">= 1.0x")
    assert ("offload-disk-bf16@cap50", "llama.cpp-f16@cap50", ">= 2x") in pairs
    assert ("offload-disk-bf16@cap50", "accelerate-bf16@cap50", ">= 10x") in pairs
    assert ("offload-disk-bf16@cap25", "llama.cpp-f16@cap25", ">= 4x") in pairs
    assert ("offload-disk-bf16@cap25", "accelerate-bf16@cap25", "report") in pairs
    assert [r.name for r in vs.plan_runs([], [50], ["int8"])] == ["offload-disk-int8@cap50", "llama.cpp-q8_0@cap50"]


# -- cgroups -------------------------------------------------------------------------------------
def test_memory_cgroup_v1_on_a_plain_folder(tmp_path) -> None:
    group = vs.MemoryCgroup.create(1, tmp_path, "g", 123456)
    assert (group.path / "memory.limit_in_bytes").read_text() == "123456"
    assert not (group.path / "memory.memsw.limit_in_bytes").exists()  # written only where the kernel has it
    group.join()
    assert (group.path / "cgroup.procs").read_text() == str(os.getpid())
    (group.path / "memory.max_usage_in_bytes").write_text("99\n")
    (group.path / "memory.usage_in_bytes").write_text("42\n")
    assert group.usage() == 42
    (group.path / "memory.failcnt").write_text("3\n")
    (group.path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (group.path / "memory.stat").write_text("cache 5\ntotal_cache 7\ntotal_pgmajfault 11\n")
    assert group.stats() == {"version": 1, "path": str(group.path), "limit_bytes": 123456, "peak_bytes": 99,
                             "oom_kill": 1, "failcnt": 3, "stat": {"total_cache": 7, "total_pgmajfault": 11}}
    for f in group.path.iterdir():  # a real cgroup's files vanish with it; a plain folder must be emptied
        f.unlink()
    group.remove()
    assert not group.path.exists()


def test_memory_cgroup_v2_reads_its_own_file_names(tmp_path) -> None:
    group = vs.MemoryCgroup.create(2, tmp_path, "g", 4096)
    assert (group.path / "memory.max").read_text() == "4096"
    (group.path / "memory.peak").write_text("2048\n")
    (group.path / "memory.current").write_text("1024\n")
    assert group.usage() == 1024
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    (group.path / "memory.stat").write_text("anon 100\nfile 200\npgmajfault 3\n")
    stats = group.stats()
    assert (stats["limit_bytes"], stats["peak_bytes"], stats["oom_kill"], stats["failcnt"]) == (4096, 2048, 1, None)
    assert stats["stat"] == {"file": 200, "anon": 100, "pgmajfault": 3}


def test_cgroup_parents_nest_inside_our_own_groups(tmp_path) -> None:
    own = "4:memory:/jobs/abc\n3:cpu,cpuacct:/\n0::/sess\n"
    assert vs.parse_proc_cgroup(own) == {"memory": "/jobs/abc", "cpu": "/", "cpuacct": "/", "": "/sess"}
    (tmp_path / "memory" / "jobs" / "abc").mkdir(parents=True)
    (tmp_path / "unified" / "sess").mkdir(parents=True)
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (tmp_path / "unified" / "sess" / "cgroup.controllers").write_text("hugetlb\n")  # hybrid: memory is v1's
    assert vs.cgroup_parents(tmp_path, own) == [(1, tmp_path / "memory" / "jobs" / "abc")]
    (tmp_path / "unified" / "sess" / "cgroup.controllers").write_text("cpu memory pids\n")
    assert vs.cgroup_parents(tmp_path, own)[0] == (2, tmp_path / "unified" / "sess")


# -- /proc/PID/io --------------------------------------------------------------------------------
def test_proc_io_is_parsed_and_counted() -> None:
    text = ("rchar: 6976\nwchar: 0\nsyscr: 10\nsyscw: 0\nread_bytes: 40960\nwrite_bytes: 0\n"
            "cancelled_write_bytes: 0\n")
    assert timing.parse_proc_io(text) == {"rchar": 6976, "wchar": 0, "syscr": 10, "syscw": 0, "read_bytes": 40960,
                                          "write_bytes": 0, "cancelled_write_bytes": 0}
    now = timing.counters()
    assert set(now) == {"read_bytes", "rchar", "major_faults", "minor_faults"} and now["rchar"] > 0


def test_timed_splits_prefill_and_decode_counters() -> None:
    import numpy as np

    def generate(clock) -> list[int]:
        clock.put(np.asarray([5, 6, 7]))
        for t in (1, 2, 3):
            clock.put(np.asarray([t]))
        return [1, 2, 3]

    s = timing.timed(generate, prompt_len=3)
    assert s["decode_tokens"] == 2 and s["new_token_ids"] == [1, 2, 3] and s["prompt_tokens"] == 3
    assert set(s["decode_counters"]) == set(s["prefill_counters"]) == {"read_bytes", "rchar", "major_faults",
                                                                        "minor_faults"}
    assert s["decode_read_bytes_per_token"] == s["decode_counters"]["read_bytes"] / 2


# -- summary and table ---------------------------------------------------------------------------
def _sample(config: str, rep: int, tps: float, tokens: list[int], **extra) -> dict:
    return {"config": config, "repeat": rep, "decode_tokens_per_s": tps, "prefill_tokens_per_s": 10 * tps,
            "load_model_s": 1.0, "max_rss_bytes": 2**30, "decode_read_bytes_per_token": 2**20,
            "decode_major_faults_per_token": 4.0, "active_weight_bytes_per_token": 10**9,
            "busy": {"other_processes_cores": 0.1}, "new_token_ids": tokens, **extra}


def _result(samples: list[dict], runs: list) -> dict:
    caps = {"bf16@cap50": vs.Cap(50, 2**31, 2**29, 0, 2**29).to_dict()}
    return {"runs": [{"engine": r.engine, "fmt": r.fmt, "cap": r.cap, "name": r.name} for r in runs],
            "summary": vs.summarize(samples, runs, 2, bandwidth=20e9), "caps": caps, "cap_formula": vs.CAP_FORMULA,
            "triad": [{"best_bytes_per_s": 20e9}, {"best_bytes_per_s": 19e9}],
            "params": {"triad_repeats": 20, "runtime_mib": 512}, "skipped": [], "notes": ["smoke run"]}


def test_summary_and_table_from_hand_made_samples() -> None:
    runs = vs.plan_runs(["bf16"], [50], ["bf16"])
    group = {"cgroup": {"peak_bytes": 3 * 2**29}}
    samples = [_sample("offload-bf16", 0, 10.0, [1, 2, 3]), _sample("offload-bf16", 1, 14.0, [1, 2, 3]),
               _sample("llama.cpp-f16", 0, 20.0, [1, 2, 4], top2_margins=[0.5, 0.25, 0.004]),
               _sample("llama.cpp-f16", 1, 20.0, [1, 2, 4]),
               _sample("offload-disk-bf16@cap50", 0, 4.0, [1, 2, 3], **group),
               _sample("llama.cpp-f16@cap50", 0, 1.0, [1, 2, 4], **group),
               {"config": "accelerate-bf16@cap50", "repeat": 0, "error": "worker exited -9"}]
    result = _result(samples, runs)
    rows, ratios = result["summary"]["configs"], result["summary"]["ratios"]
    assert rows["offload-bf16"]["decode_tokens_per_s"] == {"median": 12.0, "min": 10.0, "max": 14.0, "n": 2}
    assert rows["offload-bf16"]["weight_bytes_per_s"]["median"] == 12e9
    assert rows["offload-bf16"]["fraction_of_bandwidth"]["median"] == pytest.approx(0.6)
    assert rows["offload-bf16"]["tokens_stable"] and rows["accelerate-bf16@cap50"] == {"failed": 1, "n": 0}
    assert ratios["offload-bf16 / llama.cpp-f16"] | {} == {
        "median": 0.6, "min": 0.5, "max": 0.7, "n": 2, "of_medians": 0.6, "target": ">= 1.0x",
        "first_token_difference": 2, "tokens_compared": 3, "llama_cpp_top2_margin_there": 0.004}
    assert ratios["offload-disk-bf16@cap50 / llama.cpp-f16@cap50"]["median"] == 4.0
    assert "first_token_difference" not in ratios["offload-disk-bf16@cap50 / accelerate-bf16@cap50"]
    text = vs.table(result)
    assert "| offload-bf16 | 12.00 [10.00–14.00] | 120.0 [100.0–140.0] | 12.00 [10.00–14.00] (60 [50–70]%) |" in text
    assert "| offload-disk-bf16@cap50 | 2.00 | 4.00 [4.00–4.00] |" in text  # cap = 1 + 0.5 + 0 + 0.5 GiB
    assert "| 1.50 [1.50–1.50] | 4.0 [4.0–4.0] | 1.0 [1.0–1.0] |" in text  # cgroup peak, faults, MiB per token
    assert "| accelerate-bf16@cap50 | 2.00 | failed (1) |" in text
    assert "| offload-bf16 / llama.cpp-f16 | 0.60 [0.50–0.70]x | 0.60x | >= 1.0x | 2 (llama.cpp's top-2 logit gap " \
           "there: 0.004) |" in text
    assert "20.0 / 19.0 GB/s" in text and "Note: smoke run" in text


def test_first_difference() -> None:
    assert vs.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert vs.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert vs.first_difference([1, 2], [1, 2, 3]) == 2


# -- llama_cpp missing ---------------------------------------------------------------------------
def test_a_missing_llama_cpp_is_one_line_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(vs, "find_spec", lambda name: None)
    result = CliRunner().invoke(vs.app, ["--repeats", "1"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: llama_cpp (llama-cpp-python) is not installed")
    assert 'CMAKE_ARGS="-DLLAVA_BUILD=OFF"' in result.stderr and '"llama-cpp-python==0.3.36"' in result.stderr


def test_bad_options_are_one_line_errors() -> None:
    for args, message in ((["--formats", "fp8"], "Error: unknown formats ['fp8']"),
                          (["--caps", "150"], "Error: --caps '150'"), (["--gguf-quant", "k"], "Error: --gguf-quant")):
        result = CliRunner().invoke(vs.app, args)
        assert result.exit_code == 1 and result.stderr.startswith(message), result.stderr


# -- the triad -----------------------------------------------------------------------------------
def test_triad_arithmetic_on_a_small_array() -> None:
    assert vs.triad_bytes(1000, 4) == 12000  # read b and c, write a
    rates = vs.triad_rates(1000, 4, [0.002, 0.001, 0.004])
    assert rates["best_bytes_per_s"] == 12e6 and rates["median_bytes_per_s"] == 6e6
    measured = vs.run_triad(4096, repeats=3)
    assert measured["bytes_per_iteration"] == 3 * 4096 * 4 and len(measured["times_s"]) == 3
    assert measured["best_bytes_per_s"] >= measured["median_bytes_per_s"] > 0


# -- the bench model's tokenizer -----------------------------------------------------------------
def test_the_sentencepiece_tokenizer_and_its_tokenizers_twin_encode_alike(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")  # the [bench] extra; CI does not install it
    from tokenizers import Tokenizer

    vs.write_tokenizer(tmp_path, 1000, seed=0)
    first = (tmp_path / "tokenizer.model").read_bytes()
    vs.write_tokenizer(tmp_path, 1000, seed=0)
    assert (tmp_path / "tokenizer.model").read_bytes() == first  # seeded, one thread: the same model
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)", "  two  spaces", "héllo ✓ 日本",
             "a\n\n b\t c", *vs.corpus_lines()[100:140]]
    for text in texts:  # offload's encode (tokenizer.json, BOS prepended) = SentencePiece's, so either gives the ids
        assert tok.encode(text).ids == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_without_repack_turns_off_llama_cpps_extra_buffers_for_every_later_load() -> None:
    """A capped llama.cpp run loads with use_extra_bufts off (its --no-repack), through the params every Llama()
    starts from."""
    from types import SimpleNamespace

    worker = load_script("llamacpp_worker")

    class Params:
        use_extra_bufts = True

    fake = SimpleNamespace(llama_cpp=SimpleNamespace(llama_model_default_params=Params))
    worker.without_repack(fake)
    assert fake.llama_cpp.llama_model_default_params().use_extra_bufts is False
    assert Params().use_extra_bufts is True  # the original default is wrapped, not edited


def test_llama_cpps_model_params_have_the_field_without_repack_sets() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")  # the [bench] extra's build; CI does not install it
    assert "use_extra_bufts" in dict(llama_cpp.llama_cpp.llama_model_params._fields_)
