"""offload/serve/server.py through a real `offload serve` process on 127.0.0.1, talked to with the official openai
client and raw HTTP (httpx); plus the app in-process while its model is still loading, and the SSE pieces.

One server process serves the whole module (started once: it is the slow part). Every loop here is bounded
in count and in time, and every address is 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from typer.testing import CliRunner

import offload
from cli.main import app as cli_app
from offload.serve.chat import encode_chat, resolve_chat_template
from offload.serve.engine import Engine, Event
from offload.serve.server import Reply, ServerConfig, create_app, prometheus_text
from tests.serve_process import REQUEST_S, start_server, stop_server
from tests.tiny_models import add_char_tokenizer

KEY = "sk-test-offload"
PROMPTS = ["def f(x):", "class A:", "import os", "x = [1, 2", "# note", "while True:", "for i in", "y = {'a'"]
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("serve") / "tiny-mixtral"
    shutil.copytree(tiny_dir("mixtral"), dst)
    (dst / "chat_template.jinja").write_text(TEMPLATE)
    return add_char_tokenizer(dst)


@pytest.fixture(scope="module")
def model(model_dir):
    """The same checkpoint in this process, for the texts each prompt gets alone (generate(), no server)."""
    return offload.from_pretrained(model_dir, device="cpu", expert_budget=6)


DEFAULT_CHAT_TOKENS = 7


@pytest.fixture(scope="module")
def server_process(model_dir, tmp_path_factory):
    """The server, its key read from a file (kept out of `ps`), chat's default max_tokens lowered to tell it apart."""
    folder = tmp_path_factory.mktemp("serve-log")
    (folder / "key").write_text(KEY + "\n")
    proc, base = start_server(model_dir, folder / "serve.log", "--api-key-file", str(folder / "key"),
                              "--max-tokens-default", str(DEFAULT_CHAT_TOKENS))
    yield proc, base
    stop_server(proc)


@pytest.fixture(scope="module")
def server(server_process):
    return server_process[1]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=REQUEST_S) as c:
        yield c


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server: str, path: str, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server}{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=REQUEST_S)


def offload_run(model_dir: Path, prompt: str, tokens: int) -> str:
    result = CliRunner().invoke(cli_app, ["run", str(model_dir), prompt, "--max-new-tokens", str(tokens),
                                          "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(prompt) and result.stdout.endswith("\n")
    return result.stdout[len(prompt):-1]


def chat_alone(model, model_dir, messages, tokens: int) -> str:
    ids = encode_chat(model.tokenizer, resolve_chat_template(model_dir).render(messages))
    out = model.generate(torch.tensor([ids]), max_new_tokens=tokens)
    return model.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def sse_events(response: httpx.Response) -> list:
    """The data of each event of an SSE body, checking the framing OpenAI uses: "data: ..." lines, blank-separated."""
    text = response.read().decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


# -- the process --------------------------------------------------------------------------------------------


def test_health_and_models(server, client, model_dir):
    assert httpx.get(f"{server}/health", timeout=REQUEST_S).json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny-mixtral"]   # the folder's name
    assert client.models.retrieve("tiny-mixtral").owned_by == "offload"


def test_a_greedy_completion_equals_offload_run(client, model_dir):
    expected = offload_run(model_dir, PROMPTS[0], 12)
    c = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert c.object == "text_completion" and c.choices[0].text == expected
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (9, 12, 21)


def test_a_streamed_completion_is_openai_sse(server, model, model_dir):
    body = {"model": "tiny-mixtral", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=REQUEST_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage, final, pieces = events[-2], events[-3], events[:-3]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 8, "completion_tokens": 10,
                                                         "total_tokens": 18}
    assert final["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" and e["usage"] is None for e in [*pieces, final])
    assert all(e["choices"][0]["finish_reason"] is None for e in pieces)
    assert "".join(e["choices"][0]["text"] for e in pieces) == model.generate_text(PROMPTS[1], max_new_tokens=10)


def test_chat_whole_and_streamed(client, model, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = chat_alone(model, model_dir, messages, 10)
    whole = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_completion_tokens=10,
                                           temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert len({c.id for c in chunks}) == 1


def test_eight_concurrent_streams_each_get_what_they_get_alone(server, client, model):
    alone = {p: model.generate_text(p, max_new_tokens=16) for p in PROMPTS}
    steps = metrics(server)["offload_decode_steps_total"]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model="tiny-mixtral", prompt=prompt, max_tokens=16, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert dict(zip(PROMPTS, pool.map(stream, PROMPTS, timeout=4 * REQUEST_S))) == alone
    # they shared decode steps: one request at a time would take 15 decode steps each
    assert metrics(server)["offload_decode_steps_total"] - steps < 15 * len(PROMPTS)


def test_stop_strings_end_the_text_and_are_not_returned(client, model):
    full = model.generate_text(PROMPTS[2], max_new_tokens=16)
    stop = full[6:8]
    c = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                  stop=[stop, "never appears"])
    assert c.choices[0].text == full[: full.index(stop)] and c.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-mixtral", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(x.choices[0].text for x in chunks) == c.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seeded_sample_repeats(client):
    args = dict(model="tiny-mixtral", prompt=PROMPTS[3], max_tokens=12, temperature=1.5, seed=7)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


GOOD = {"model": "tiny-mixtral", "prompt": "abc", "max_tokens": 4}


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"model": "tiny-mixtral", "prompt": ', 400, None, None),                      # malformed JSON
    (b"[1, 2]", 400, None, None),                                                    # JSON, not an object
    ({"model": "tiny-mixtral"}, 400, "prompt", None),                                # missing field
    ({"prompt": "abc"}, 400, "model", None),
    ({**GOOD, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens", None),
    ({**GOOD, "max_tokens": "many"}, 400, "max_tokens", None),
    ({**GOOD, "temperature": 3}, 400, "temperature", None),
    ({**GOOD, "n": 2}, 400, "n", None),
    ({**GOOD, "stop": ["", "x"]}, 400, "stop", None),
    ({**GOOD, "prompt": "x" * 120, "max_tokens": 20}, 400, "prompt", "context_length_exceeded"),
    ({**GOOD, "prompt": [1, 2, 10_000]}, 400, "prompt", None),                       # token id outside the vocab
    ({**GOOD, "prompt": ["a", "b"]}, 400, "prompt", None),
    # strict types: nothing is coerced
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", None),
    ({**GOOD, "max_tokens": True}, 400, "max_tokens", None),
    ({**GOOD, "max_tokens": 5.0}, 400, "max_tokens", None),
    ({**GOOD, "stream": "yes"}, 400, "stream", None),
    ({**GOOD, "stop": 3}, 400, "stop", None),
    # finite floats, bounded integers
    (b'{"model": "tiny-mixtral", "prompt": "abc", "temperature": Infinity}', 400, "temperature", None),
    (b'{"model": "tiny-mixtral", "prompt": "abc", "temperature": NaN}', 400, "temperature", None),
    (b'{"model": "tiny-mixtral", "prompt": "abc", "top_p": 1e400}', 400, "top_p", None),
    ({**GOOD, "seed": 2**64}, 400, "seed", None),
    ({**GOOD, "max_tokens": 2**40}, 400, "max_tokens", None),
    ({**GOOD, "top_k": -1}, 400, "top_k", None),
    # text that is not text, JSON nested past the parser's limit, a prompt longer than any that fits (not tokenized)
    (b'{"model": "tiny-mixtral", "prompt": "a\\ud800b"}', 400, None, None),
    (b'{"model": "tiny-mixtral", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),
    (b'\xff\xfe{}', 400, None, None),
    ({**GOOD, "prompt": "x" * 1_000_000}, 400, "prompt", "context_length_exceeded"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param, code):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert "Error" not in error["message"] and "Traceback" not in error["message"]   # no Python exception names
    assert httpx.get(f"{server}/health", timeout=REQUEST_S).json() == {"status": "ok"}   # it keeps serving


def test_bad_chat_requests(server):
    cases = [({"model": "tiny-mixtral", "messages": []}, "messages is empty"),
             ({"model": "tiny-mixtral", "messages": [{"role": "user"}]}, "content is missing"),
             ({"model": "tiny-mixtral", "messages": "hi"}, "messages: "),
             ({"model": "tiny-mixtral", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
              "only text parts are supported"),
             (b'{"model": "tiny-mixtral", "messages": [{"role": "user", "content": "\\udfff"}]}', "not valid JSON"),
             ({"model": "tiny-mixtral", "messages": [{"role": "user", "content": "x" * 2_000_000}]},
              "longer than any text that fits the context")]
    for body, message in cases:
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_api_key_and_unknown_paths(server):
    for headers, message in (({}, "Missing API key"), ({"Authorization": "Bearer wrong"}, "Incorrect API key")):
        r = post(server, "/v1/completions", GOOD, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert message in r.json()["error"]["message"]
    with openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0, timeout=REQUEST_S) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    r = httpx.get(f"{server}/v2/nothing", timeout=REQUEST_S)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/metrics", timeout=REQUEST_S).status_code == 200   # open without a key


def test_the_openai_client_raises_its_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="abc", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-mixtral", prompt="x" * 200, max_tokens=2)


def metrics(server: str) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics", timeout=REQUEST_S).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def test_a_client_that_disconnects_is_cancelled_and_the_server_goes_on(server, client, model):
    before = metrics(server).get('offload_requests_finished_total{reason="cancelled"}', 0)
    body = {**GOOD, "prompt": PROMPTS[4], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=REQUEST_S) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")           # it is streaming; now go away mid-stream
    deadline = time.monotonic() + REQUEST_S
    while time.monotonic() < deadline:
        m = metrics(server)
        if m.get('offload_requests_finished_total{reason="cancelled"}', 0) > before:
            break
        time.sleep(0.1)
    assert m['offload_requests_finished_total{reason="cancelled"}'] == before + 1
    assert m["offload_requests_running"] == 0
    c = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[5], max_tokens=6, temperature=0)
    assert c.choices[0].text == model.generate_text(PROMPTS[5], max_new_tokens=6)


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="tiny-mixtral", prompt=PROMPTS[6], max_tokens=3)   # whatever ran before
    text = httpx.get(f"{server}/metrics", timeout=REQUEST_S).text
    assert "# TYPE offload_cache_hits_total counter" in text and "# TYPE offload_requests_running gauge" in text
    m = metrics(server)
    assert m["offload_ready"] == 1 and m["offload_expert_slots"] == 6 and m["offload_experts"] == 12
    assert m["offload_tokens_generated_total"] > 0 and m["offload_decode_steps_total"] > 0
    assert m["offload_cache_misses_total"] > 0 and m["offload_expert_bytes_loaded_total"] > 0
    assert 0 < m["offload_distinct_experts_per_step"] <= 4


# -- in process: the app while the model loads, and the SSE pieces --------------------------------------------


def test_the_app_answers_503_while_loading_then_serves(model):
    from fastapi.testclient import TestClient

    gate = threading.Event()
    engine = Engine(lambda: gate.wait(REQUEST_S) and model)
    with TestClient(create_app(engine, ServerConfig("m"))) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json() == {"status": "loading"}
        r = http.post("/v1/completions", json={"model": "m", "prompt": "ab", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        assert engine.wait_ready(REQUEST_S)
        assert http.get("/health").json() == {"status": "ok"}
        r = http.post("/v1/completions", json={"model": "m", "prompt": "ab", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == model.generate_text("ab", max_new_tokens=2)
    assert engine.state == "stopped"


def test_reply_chunks_have_openai_shapes():
    chat, text = Reply(True, "m", include_usage=True), Reply(False, "m")
    assert chat.chunk(role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.chunk("hi")["choices"][0]["delta"] == {"content": "hi"} and chat.chunk("hi")["usage"] is None
    assert chat.chunk(finish_reason="stop")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                              "finish_reason": "stop"}
    assert chat.usage_chunk(Event("", "stop", 3, 4))["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                                  "total_tokens": 7}
    assert "usage" not in text.chunk("x") and text.chunk("x")["choices"][0]["text"] == "x"
    assert text.whole("abc", Event("", "length", 1, 2))["choices"][0]["finish_reason"] == "length"
    assert chat.id.startswith("chatcmpl-") and text.id.startswith("cmpl-")


def test_prometheus_text_lists_every_reason():
    from offload.serve.engine import EngineMetrics

    text = prometheus_text(EngineMetrics(state="ready", requests_finished={"stop": 2, "cancelled": 1}))
    assert 'offload_requests_finished_total{reason="cancelled"} 1' in text and "offload_ready 1" in text
    assert text.endswith("\n") and "offload_pruned_routing_share" not in text  # only under --prune
    text = prometheus_text(EngineMetrics(state="ready", task_matches={"code": 3, "generic": 1},
                                         pruned_share={0: 0.25, 2: 0.5}, warm_hits=7))
    assert 'offload_task_matches_total{task="code"} 3' in text and "offload_warm_hits_total 7" in text
    assert 'offload_pruned_routing_share{layer="2"} 0.5' in text


# -- what a client cannot do to the server ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_vanishing_temperature_is_served_as_the_greedy_text(client, server, model, temperature):
    # 1e-300 passed validation (0 < t <= 2), overflowed to NaN in sampling, and the engine thread's exception
    # ended the whole process
    c = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[7], max_tokens=8, temperature=temperature)
    assert c.choices[0].text == model.generate_text(PROMPTS[7], max_new_tokens=8)
    assert httpx.get(f"{server}/health", timeout=REQUEST_S).json() == {"status": "ok"}


def test_refused_seeds_never_fill_the_queue(server, client, model):
    # a seed torch refused was a 500 that left the waiting counter one higher: 64 of them and every request got 503
    for _ in range(70):
        r = post(server, "/v1/completions", {**GOOD, "seed": 2**64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    for seed in (-(2**63), -1, 2**63 - 1):                # OpenAI's int64 range is served
        assert post(server, "/v1/completions", {**GOOD, "seed": seed, "temperature": 1}).status_code == 200
    assert metrics(server)["offload_requests_waiting"] == 0
    c = client.completions.create(model="tiny-mixtral", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert c.choices[0].text == model.generate_text(PROMPTS[0], max_new_tokens=5)


def test_oversized_bodies_get_413_before_they_cost_memory(server_process):
    from tests.rss import peak_rss_mib

    proc, server = server_process
    before = peak_rss_mib(proc.pid)
    body = b'{"model": "tiny-mixtral", "prompt": "' + b"x" * (50 * 2**20) + b'"}'
    declared = post(server, "/v1/completions", body)

    def chunks():                                         # no Content-Length: refused as it streams past the limit
        yield b'{"model": "tiny-mixtral", "prompt": "'
        for _ in range(800):
            yield b"x" * 65536

    streamed = httpx.post(f"{server}/v1/completions", content=chunks(), headers={**AUTH, "Content-Type":
                                                                                   "application/json"},
                          timeout=REQUEST_S)
    for r in (declared, streamed):
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "larger than this server's limit of 4194304 bytes (--max-request-bytes)" in r.json()["error"]["message"]
    # a 50 MB prompt grew this process by 5 GB (13.7 GB as a chat message) and stalled /health for minutes
    assert peak_rss_mib(proc.pid) < before + 64, (before, peak_rss_mib(proc.pid))
    assert httpx.get(f"{server}/health", timeout=REQUEST_S).json() == {"status": "ok"}


def test_chat_without_max_tokens_takes_the_servers_default(client, model, model_dir):
    messages = [{"role": "user", "content": "def"}]
    whole = client.chat.completions.create(model="tiny-mixtral", messages=messages, temperature=0)
    assert whole.usage.completion_tokens <= DEFAULT_CHAT_TOKENS   # --max-tokens-default (the context's rest before)
    assert whole.choices[0].message.content == chat_alone(model, model_dir, messages, DEFAULT_CHAT_TOKENS)


def test_a_failed_generation_is_a_500_and_a_closed_stream_and_the_server_serves_on(model, monkeypatch):
    from fastapi.testclient import TestClient

    real, calls = model.model.forward, [0]

    def forward(*args, **kwargs):                         # the first two forward passes fail
        calls[0] += 1
        if calls[0] <= 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    engine = Engine(lambda: model)
    body = {"model": "m", "prompt": "ab", "max_tokens": 3, "temperature": 0}
    with TestClient(create_app(engine, ServerConfig("m"))) as http:
        assert engine.wait_ready(REQUEST_S)
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"] == {
            "message": "generation failed: internal error while generating (see the server's log)",
            "type": "server_error", "param": None, "code": None}
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events = sse_events(s)
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == model.generate_text("ab", max_new_tokens=3)
        assert http.get("/health").json() == {"status": "ok"}
