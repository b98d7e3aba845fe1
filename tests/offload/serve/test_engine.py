"""offload/serve/engine.py without HTTP: the engine thread's text equals generate()'s, alone or beside others; stop
strings, cancellation (the KV row comes back), the queue and context limits, stop() and a failed load all end
every accepted request with exactly one final event. Every wait is bounded."""

from __future__ import annotations

import queue
import shutil
import threading

import pytest

import offload
from offload.errors import BudgetError, BusyError, ContextError
from offload.serve.engine import Engine, Event, GenerationRequest
from tests.tiny_models import add_char_tokenizer

WAIT_S = 60  # per final event: generous for a loaded 2-core machine; a healthy run takes well under a second
PROMPTS = ["def f(x):", "class A:", "import os", "x = [1, 2", "# note", "while True:"]


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("engine") / "mixtral"
    shutil.copytree(tiny_dir("mixtral"), dst)
    return offload.from_pretrained(add_char_tokenizer(dst), device="cpu", expert_budget=5, batch_size=4, context=64)


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's greedy text from generate(), before any engine thread touches the model."""
    return {p: model.generate_text(p, max_new_tokens=12) for p in PROMPTS}


class Collector:
    """A deliver callback that keeps one request's events, and waits for its final one."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def result(self) -> tuple[str, Event]:
        while not self.seen or self.seen[-1].finish_reason is None:
            self.seen.append(self.events.get(timeout=WAIT_S))
        return "".join(e.text for e in self.seen), self.seen[-1]


def request(model, prompt: str, max_new_tokens: int = 12, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(tuple(model.encode(prompt)[0].tolist()), model.sampling_config(
        max_new_tokens=max_new_tokens, do_sample=False), stop)


@pytest.fixture
def engine(model, alone):
    e = Engine(lambda: model).start()
    assert e.wait_ready(WAIT_S)
    yield e
    e.stop()


def submit(engine, model, prompt, **kwargs) -> Collector:
    out = Collector()
    engine.submit(request(model, prompt, **kwargs), out)
    return out


def test_a_request_gets_what_generate_gives_it(engine, model, alone):
    text, last = submit(engine, model, PROMPTS[0]).result()
    assert text == alone[PROMPTS[0]]
    assert (last.finish_reason, last.completion_tokens) == ("length", 12)
    assert last.prompt_tokens == len(PROMPTS[0])          # character tokenizer: one token per character


def test_concurrent_requests_each_get_what_they_get_alone(engine, model, alone):
    collectors = {p: submit(engine, model, p) for p in PROMPTS}  # 6 requests, batch 4, pool 8
    assert {p: c.result()[0] for p, c in collectors.items()} == alone
    m = engine.metrics()
    assert m.tokens_generated == 12 * len(PROMPTS) and m.requests_finished == {"length": len(PROMPTS)}
    assert (m.requests_running, m.requests_waiting) == (0, 0) and m.decode_steps >= 11
    assert m.expert_slots == 5 and m.total_experts == 12 and m.cache_misses > 0


def test_a_stop_string_ends_the_request_and_is_not_returned(engine, model, alone):
    full = alone[PROMPTS[0]]
    stop = full[5:7]                                       # two characters from inside the reference text
    text, last = submit(engine, model, PROMPTS[0], stop=(stop,)).result()
    assert text == full[: full.index(stop)] and last.finish_reason == "stop"
    assert last.completion_tokens < 12


def test_refusals_queue_nothing(engine, model):
    with pytest.raises(ContextError, match="exceed the context of 64 tokens"):
        engine.submit(request(model, "x" * 60, max_new_tokens=5), Collector())
    assert engine.metrics().requests_waiting == 0


def test_the_queue_limit_and_cancellation_before_a_row(model, alone):
    gate = threading.Event()                               # holds the engine thread after loading
    engine = Engine(lambda: model, max_queue=2, on_ready=lambda m: gate.wait(WAIT_S)).start()
    try:
        assert engine.wait_ready(WAIT_S)
        first, second = submit(engine, model, PROMPTS[0]), Collector()
        ticket = engine.submit(request(model, PROMPTS[1]), second)
        with pytest.raises(BusyError, match="2 requests are already waiting"):
            submit(engine, model, PROMPTS[2])
        assert engine.metrics().requests_waiting == 2
        ticket.cancel()                                    # before it ever had a KV row
        gate.set()
        assert first.result()[0] == alone[PROMPTS[0]]
        assert second.result() == ("", Event("", "cancelled", len(PROMPTS[1]), 0))
        assert engine.metrics().requests_waiting == 0
    finally:
        gate.set()
        engine.stop()


def test_a_cancelled_request_frees_its_row_and_the_engine_goes_on(engine, model, alone):
    out = Collector()
    ticket = engine.submit(request(model, PROMPTS[2], max_new_tokens=40), out)
    out.seen.append(out.events.get(timeout=WAIT_S))        # it is running: its first text arrived
    ticket.cancel()
    _, last = out.result()
    assert last.finish_reason == "cancelled" and last.completion_tokens < 40
    assert submit(engine, model, PROMPTS[3]).result()[0] == alone[PROMPTS[3]]
    assert engine.metrics().requests_finished["cancelled"] == 1
    assert len(engine._batch.free_rows) == engine._batch.config.pool   # every KV row is free again


def test_stop_ends_running_requests_and_refuses_new_ones(model):
    gate = threading.Event()
    engine = Engine(lambda: model, on_ready=lambda m: gate.wait(WAIT_S)).start()
    assert engine.wait_ready(WAIT_S)
    out = submit(engine, model, PROMPTS[4], max_new_tokens=40)
    engine.stop(timeout=0)                                 # the thread is held: do not wait for it here
    gate.set()
    engine._thread.join(WAIT_S)
    _, last = out.result()
    assert last.finish_reason == "cancelled" and engine.state == "stopped"
    with pytest.raises(BusyError, match="the server is stopping"):
        submit(engine, model, PROMPTS[0])


def test_a_failed_load_is_reported_once(model):
    errors = []

    def load():
        raise BudgetError("expert budget '100%' does not fit", "use auto")

    engine = Engine(load, on_fatal=errors.append).start()
    assert not engine.wait_ready(WAIT_S)
    engine._thread.join(WAIT_S)
    assert engine.state == "failed" and isinstance(engine.error, BudgetError) and errors == [engine.error]
    with pytest.raises(BusyError, match="the engine failed"):
        submit(engine, model, PROMPTS[0])


def test_an_exception_while_serving_ends_its_requests_and_the_engine_serves_on(engine, model, alone, monkeypatch):
    real, calls = model.model.forward, [0]

    def forward(*args, **kwargs):                          # one forward raises: a bug, or a failed disk read
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    results = [c.result() for c in [submit(engine, model, p) for p in PROMPTS[:3]]]
    errors = [last for _, last in results if last.finish_reason == "error"]
    assert errors and all(e.error == "internal error while generating (see the server's log)" for e in errors)
    assert all(text == alone[p] for p, (text, last) in zip(PROMPTS, results) if last.finish_reason != "error")
    assert engine.state == "ready"
    assert {p: submit(engine, model, p).result()[0] for p in PROMPTS} == alone   # the engine goes on, right
    m = engine.metrics()
    assert (m.requests_running, m.requests_waiting) == (0, 0) and m.requests_finished["error"] == len(errors)
    model.cache.check()


def test_a_request_refused_while_being_made_is_never_counted(engine, model, alone, monkeypatch):
    # submit() used to count a request before making it, so each one that failed there (a seed torch refused)
    # left the waiting counter one higher: after max_queue of them every request got "queue limit"
    def broken(request, deliver):
        raise ValueError("Overflow when unpacking long long")

    monkeypatch.setattr(engine, "_make_live", broken)
    for _ in range(engine.max_queue + 6):
        with pytest.raises(ValueError):
            engine.submit(request(model, PROMPTS[0]), Collector())
    assert engine.metrics().requests_waiting == 0
    monkeypatch.undo()
    assert submit(engine, model, PROMPTS[0]).result()[0] == alone[PROMPTS[0]]


def test_task_patterns_warm_each_request_and_show_in_the_metrics(tmp_path):
    from offload.tools.profile import model_identity, profile
    from tests.paths import ROOT

    traces = ROOT / "scripts" / "results" / "traces"
    patterns = profile(None, {}, {"code": [traces / "tiny-moe-stdlib-heldout.jsonl.gz"],
                                  "prose": [traces / "tiny-moe-stdlib-prose.jsonl.gz"]},
                       ident=model_identity("tiny-moe"))
    patterns.save(tmp_path / "patterns.json")
    model = offload.from_pretrained("tiny-moe", expert_budget="25%", batch_size=2, context=128,
                                    patterns=tmp_path / "patterns.json")
    prompts = ["def parse(self, text):\n    ", "The module reads the whole file", "class Queue:\n    def"]
    alone = {p: model.generate_text(p, max_new_tokens=8) for p in prompts}
    model.stats.reset()
    engine = Engine(lambda: model).start()
    try:
        assert engine.wait_ready(WAIT_S)
        collectors = {p: submit(engine, model, p, max_new_tokens=8) for p in prompts}
        assert {p: c.result()[0] for p, c in collectors.items()} == alone  # warm starts change no token
        m = engine.metrics()
    finally:
        engine.stop()
    assert sum(m.task_matches.values()) == len(prompts) and m.warm_loads > 0 and 0 < m.task_confidence <= 1
    assert m.pruned_share == {}
    from offload.serve.server import prometheus_text

    text = prometheus_text(m)
    assert "offload_warm_loads_total" in text and "offload_task_matches_total{task=" in text
