"""Continuous batching: a request's tokens do not depend on the scheduler, batch size, budget or
prefill chunking; results keep the prompts' order; the KV pool computes what a per-request KV cache does,
linear-attention state rows included."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import offload
from cli.main import app
from offload.errors import ConfigError
from offload.runtime.batch import BatchConfig, BatchEngine, BatchRequest, Completion
from tests.tiny_models import add_char_tokenizer

PROMPTS = [[5, 17, 33, 60, 8], [9, 8, 7], [40, 41, 42, 43, 44, 45, 46], [3], [60, 5, 17], [21, 22, 23, 24]]
NEW = 6


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Each prompt generated alone with the plain KV cache: what every batched run must reproduce."""
    path = tiny_dir("qwen2_moe")  # a dense layer between MoE layers, shared expert
    model = offload.from_pretrained(path, device="cpu")
    alone = [model.generate(torch.tensor([p]), max_new_tokens=NEW, eos_token_id=[])[0, len(p):].tolist()
             for p in PROMPTS]
    return path, alone


@pytest.mark.parametrize("scheduler, batch_size, budget, chunk", [
    ("fifo", 1, "100%", 0), ("fifo", 3, 1, 2), ("expert-aware", 3, "50%", 0), ("expert-aware", 4, 2, 3),
    ("expert-aware", 8, "100%", 1),
])
def test_tokens_do_not_depend_on_batching(reference, scheduler, batch_size, budget, chunk):
    path, alone = reference
    model = offload.from_pretrained(path, device="cpu", expert_budget=budget)
    out = model.generate_many(PROMPTS, max_new_tokens=NEW, batch_size=batch_size, scheduler=scheduler,
                              prefill_chunk=chunk, max_wait=2, eos_token_id=[])
    assert [c.id for c in out] == list(range(len(PROMPTS)))  # the prompts' order, whatever ran first
    assert [c.token_ids for c in out] == alone
    assert all(c.finish_reason == "length" and c.prompt_tokens == len(p) for c, p in zip(out, PROMPTS))
    t = model.stats.total
    assert 0 < t.distinct_per_step <= model.spec.num_experts
    assert model.stats.decode_tokens == len(PROMPTS) * (NEW - 1)  # the first token comes from prefill


@pytest.mark.parametrize("predictor", ["pregate", "prev-token", "markov"])
def test_tokens_do_not_depend_on_prefetching_while_batching(reference, predictor):
    # The prefetcher keys each sequence's history by its KV row, which rows reuse as requests finish.
    path, alone = reference
    model = offload.from_pretrained(path, device="cpu", expert_budget=5, predictor=predictor, lookahead=2)
    out = model.generate_many(PROMPTS, max_new_tokens=NEW, batch_size=2, scheduler="expert-aware", eos_token_id=[])
    assert [c.token_ids for c in out] == alone
    t = model.stats.total
    assert t.prefetch_issued > 0 and t.prefetch_issued == t.prefetch_used + t.prefetch_wasted + model.cache.prefetched
    model.cache.close()


def test_eos_ends_a_request_and_frees_its_row(reference):
    path, alone = reference
    model = offload.from_pretrained(path, device="cpu")
    eos = alone[0][2]  # the third token of request 0 ends it (and any other request that emits it)
    out = model.generate_many(PROMPTS, max_new_tokens=NEW, batch_size=2, pool_size=2, eos_token_id=eos)
    for c, full in zip(out, alone):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert c.token_ids == expected
        assert c.finish_reason == ("eos" if eos in full else "length")


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(max_wait=-1), dict(pool_size=1.5)])
def test_bad_batch_config(kwargs):
    with pytest.raises(ConfigError):
        BatchConfig(**kwargs)


def test_unknown_scheduler(reference):
    model = offload.from_pretrained(reference[0], device="cpu")
    with pytest.raises(ConfigError, match="scheduler"):
        model.generate_many(PROMPTS, scheduler="random")


# ----------------------------------------------------------------------------------- linear-attention state rows


@pytest.fixture(scope="module")
def hybrid(tiny_dir):
    """Qwen3-Next (Gated DeltaNet state rows beside KV rows), each prompt generated alone."""
    path = tiny_dir("qwen3_next")
    model = offload.from_pretrained(path, device="cpu")
    alone = [model.generate(torch.tensor([p]), max_new_tokens=NEW, eos_token_id=[])[0, len(p):].tolist()
             for p in PROMPTS]
    return path, alone


@pytest.mark.parametrize("batch_size, pool_size, chunk, predictor", [(2, 2, 0, "none"), (3, 3, 2, "pregate")])
def test_state_rows_decode_as_alone(hybrid, batch_size, pool_size, chunk, predictor):
    """Requests of different lengths join as rows free up (a pool smaller than the prompts); a prompt prefilled in
    chunks continues its conv and recurrent state from chunk to chunk; a row's state starts from zero for each
    request it serves."""
    path, alone = hybrid
    model = offload.from_pretrained(path, device="cpu", expert_budget="50%", predictor=predictor)
    out = model.generate_many(PROMPTS, max_new_tokens=NEW, batch_size=batch_size, pool_size=pool_size,
                              prefill_chunk=chunk, scheduler="expert-aware", eos_token_id=[])
    assert [c.token_ids for c in out] == alone
    model.cache.close()


def test_a_cancelled_requests_state_row_is_reused_cleanly(hybrid):
    path, alone = hybrid
    model = offload.from_pretrained(path, device="cpu")
    engine = BatchEngine(model.model, BatchConfig(batch_size=1, pool_size=1), rows=1, capacity=16)
    sampling = model.sampling_config(max_new_tokens=NEW, eos_token_id=[])
    first = engine.submit(BatchRequest(PROMPTS[2], sampling, Completion(0, None, len(PROMPTS[2]))))
    engine.step()
    engine.step()  # the row's state now holds request 0's prompt and two decoded tokens
    first.cancel()
    second = engine.submit(BatchRequest(PROMPTS[0], sampling, Completion(1, None, len(PROMPTS[0]))))
    done = []
    while engine.busy:
        done += engine.step()
    assert first.completion.finish_reason == "cancelled" and first.row == second.row == 0
    assert second.completion.token_ids == alone[0]
    engine.close()


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def text_model(tiny_dir, tmp_path_factory):
    """A copy: the session's shared mixtral folder stays without a tokenizer (test_errors needs that)."""
    return add_char_tokenizer(shutil.copytree(tiny_dir("mixtral"), tmp_path_factory.mktemp("text") / "m"))


def test_cli_prompts_file_writes_results_in_order(text_model, tmp_path):
    prompts = ["hello", "abc", "the cat", "zz"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "results.jsonl"
    result = CliRunner().invoke(app, ["run", str(text_model), "--prompts-file", str(tmp_path / "p.jsonl"),
                                      "--out", str(out), "--batch-size", "3", "--scheduler", "expert-aware",
                                      "--max-new-tokens", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and [r["prompt"] for r in rows] == prompts
    model = offload.from_pretrained(text_model, device="cpu")
    for r, p in zip(rows, prompts):
        assert r["completion"] == model.generate_text(p, max_new_tokens=5)
        assert r["completion_tokens"] == len(r["token_ids"]) <= 5


@pytest.mark.parametrize("args, match", [
    (["hello", "--prompts-file", "PROMPTS"], "either a PROMPT or --prompts-file"),
    ([], "either a PROMPT or --prompts-file"),
    (["hello", "--out", "r.jsonl"], "--out needs --prompts-file"),
    (["--prompts-file", "PROMPTS", "--scheduler", "random"], "scheduler"),
    (["--prompts-file", "PROMPTS", "--batch-size", "0"], "batch-size"),
])
def test_cli_batch_errors(text_model, tmp_path, args, match):
    (tmp_path / "p.txt").write_text("hello\nworld\n")
    args = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in args]
    result = CliRunner().invoke(app, ["run", str(text_model), *args, "--device", "cpu"])
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and match in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("where", ["prefill", "decode", "callback"])
def test_a_request_that_fails_ends_alone_and_the_engine_goes_on(reference, monkeypatch, where):
    # One request (prompt 2) fails at its first sampling (prefill), at a later one (decode), or in its token
    # callback: it ends with finish reason "error" and its exception; the others get what they get alone, and
    # a request submitted after it as well.
    from offload.runtime import batch
    from offload.runtime.batch import BatchEngine, BatchRequest, Completion
    from offload.runtime.sampling import SamplingConfig

    path, alone = reference
    model = offload.from_pretrained(path, device="cpu", expert_budget=2)
    sampling = SamplingConfig(max_new_tokens=NEW, eos_token_ids=())
    bad = sampling if where == "callback" else SamplingConfig(max_new_tokens=NEW, eos_token_ids=(), top_k=7)
    calls = {"n": 0}
    real_sample = batch.sample

    def sample(logits, config, generator=None):
        if config is bad and where != "callback":
            calls["n"] += 1
            if calls["n"] == (1 if where == "prefill" else 3):
                raise RuntimeError("injected")
        return real_sample(logits, config, generator)

    monkeypatch.setattr(batch, "sample", sample)
    engine = BatchEngine(model.model, BatchConfig(batch_size=3), rows=4, capacity=32)
    requests = [BatchRequest(list(p), bad if i == 2 else sampling, Completion(i, None, len(p)))
                for i, p in enumerate(PROMPTS[:4])]
    if where == "callback":
        requests[2].on_token = lambda completion, token: 1 / 0
    for r in requests:
        engine.submit(r)
    done = []
    while engine.busy:
        done += engine.step()
    failed = [r for r in done if r.completion.finish_reason == "error"]
    assert failed == [requests[2]] and isinstance(requests[2].error, (RuntimeError, ZeroDivisionError))
    assert [r.completion.token_ids for r in requests if r is not requests[2]] == [alone[0], alone[1], alone[3]]
    later = engine.submit(BatchRequest(list(PROMPTS[4]), sampling, Completion(9, None, len(PROMPTS[4]))))
    while engine.busy:
        engine.step()
    assert later.completion.token_ids == alone[4] and sorted(engine.free_rows) == [0, 1, 2, 3]
    model.cache.check()
    if where != "callback":  # generate_many is an API call: the failure is raised, not returned
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="injected"):
            batch.generate_many(model.model, [list(PROMPTS[0])], BatchConfig(), bad)
