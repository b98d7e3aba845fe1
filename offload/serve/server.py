"""``offload serve``'s HTTP side: OpenAI's completions and chat completions API over the serving Engine.

The event loop only parses, checks, encodes and streams; the engine thread (serve/engine.py) does the model's work.
What a client sees follows OpenAI's API, so its official clients and the tools built on them work unchanged:

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` take ``model``, ``prompt`` / ``messages``,
  ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``, ``n`` = 1,
  ``stream`` and ``stream_options.include_usage`` (and ``top_k``, as vLLM does). Unset sampling fields take the
  checkpoint's generation_config.json, as ``offload run`` does; temperature 0 is greedy. ``max_tokens``
  defaults to 16 for completions (OpenAI's default) and to ``--max-tokens-default`` for chat (within the
  context's rest).
- Every field is validated by type and range in one schema per endpoint (below), straight from the body's bytes;
  a body over ``--max-request-bytes`` is a 413 before it is read whole; text is rendered and tokenized on the
  encoder threads, never on the event loop, and text longer than any that fits the context is refused before
  the tokenizer sees it.
- Streams are Server-Sent Events as OpenAI sends them: ``data: {json}\\n\\n`` chunks of
  ``text_completion`` / ``chat.completion.chunk`` (a chat's first delta carries ``role: "assistant"``), a
  last chunk with ``finish_reason`` "stop" or "length", a usage chunk with empty ``choices`` when asked for,
  then ``data: [DONE]``. A client that goes away cancels its request (the engine frees its KV row).
- Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON or fields and for a prompt
  over the context, 401 for a missing or wrong API key (``/v1`` only; ``/health`` and ``/metrics`` stay open
  for probes and scrapers), 404 for another model's name or an unknown path, 413 for a body over the limit,
  500 when generating failed (that request only: the engine serves on), 503 while loading, stopping or at the
  queue limit. Nothing a client sends stops the server.
- SIGINT / SIGTERM (DrainingServer): running requests get ``--shutdown-timeout`` seconds, then each open one ends
  with its final event (a stream: an error chunk and ``[DONE]``) before uvicorn closes the connections.
- ``GET /health``, ``GET /v1/models`` and ``GET /metrics`` (Prometheus text: the cache's and the engine's
  counters and the expert budget in use).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from offload.errors import BusyError, ConfigError, ContextError, OffloadError
from offload.runtime.sampling import SEED_RANGE, SamplingConfig
from offload.serve.chat import ChatTemplate, encode_chat, resolve_chat_template, validate_messages
from offload.serve.engine import Engine, EngineMetrics, Event, GenerationRequest, Ticket

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
TEXT_SLACK = 4         # see Api.text_limit
DRAIN_S = 10.0         # after the grace period, how long uvicorn waits for the ended streams to close
DISCONNECT_POLL_S = 0.5  # a non-streamed request checks this often whether its client is still there
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _offload_error(e: OffloadError, param: str | None) -> ApiError:
    if isinstance(e, BusyError):
        return ApiError(503, str(e), "server_error", code="overloaded")
    if isinstance(e, ContextError):
        return ApiError(400, str(e), param=param, code="context_length_exceeded")
    return ApiError(400, str(e), param=param)


# -- request schemas -------------------------------------------------------------------------------------
#
# One schema per endpoint, parsed straight from the body's bytes by pydantic's own JSON parser: strict types ("5"
# is not 5, true is not 1), finite floats (NaN, Infinity and 1e400 are refused), bounded integers and lists; a lone
# surrogate or JSON nested deeper than the parser's limit is invalid JSON. Every refusal is a 400 naming the field.

INT64 = 2**63
Int = Annotated[int, Field(ge=-INT64, lt=INT64)]   # what a 64-bit client may send
Tokens = Annotated[int, Field(ge=1, lt=2**31)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)  # unknown fields are ignored, as OpenAI does


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Generation(BaseModel):
    """The fields both endpoints share; other fields are ignored, as OpenAI's API ignores unknown ones."""

    model_config = STRICT

    model: str
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, lt=2**31)
    seed: Int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: Int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of a value this server cannot honour, rather than silently ignoring it."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.presence_penalty or self.frequency_penalty:
            return ("presence_penalty" if self.presence_penalty else "frequency_penalty"), "penalties are not supported"
        if self.stop is not None and any(not s for s in self.stops):
            return "stop", "stop strings must not be empty"
        return None

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


TokenIds = list[Annotated[int, Field(ge=0, lt=INT64)]]


class CompletionRequest(_Generation):
    prompt: str | TokenIds | list[str] | list[TokenIds]
    echo: bool = False
    logprobs: Int | None = None
    best_of: Int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for name, value in (("echo", self.echo), ("logprobs", self.logprobs), ("suffix", self.suffix)):
            if value:
                return name, f"{name} is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        return super().unsupported()


class ChatRequest(_Generation):
    messages: list[dict[str, Any]]
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return validate_messages(messages)  # the structure a chat template may rely on (serve/chat.py)
        except ConfigError as e:
            raise ValueError(e.message) from None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs is not supported"
        if self.tools:
            return "tools", "tool calls are not supported"
        return super().unsupported()


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, refused with a 413 as soon as it is over ``limit`` (before it is all in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, more=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, more: bool = False) -> ApiError:
    return ApiError(413, f"the request body ({'over ' if more else ''}{size} bytes) is larger than this server's "
                         f"limit of {limit} bytes (--max-request-bytes)", code="request_too_large")


def parse_body(raw: bytes, schema: type[_Generation]) -> _Generation:
    """The request's JSON as ``schema``, or a 400 naming the field at fault."""
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})"
                           ) from None
        if not first["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        param = str(first["loc"][0])
        where = ".".join(map(str, first["loc"]))
        message = f"{where} is required" if first["type"] == "missing" else f"{where}: {first['msg']}"
        raise ApiError(400, message.removeprefix(f"{where}: Value error, ").replace("Value error, ", ""),
                       param=param) from None
    if (bad := body.unsupported()) is not None:
        raise ApiError(400, bad[1], param=bad[0])
    return body


# -- responses --------------------------------------------------------------------------------------------


def sse(obj: dict) -> str:
    """One Server-Sent Event with compact JSON, as OpenAI sends it."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


class Reply:
    """One response's identity and the OpenAI JSON of its whole body or its stream chunks."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False) -> None:
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, event: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": event.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        return {**self._envelope("chat.completion" if self.chat else "text_completion", [choice]),
                "usage": usage(event)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        return {**out, "usage": None} if self.include_usage else out

    def usage_chunk(self, event: Event) -> dict:
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []),
                "usage": usage(event)}


def _ended_badly(event: Event) -> ApiError:
    if event.finish_reason == "cancelled":
        return ApiError(503, "the server is stopping; the request was cancelled", "server_error", code="overloaded")
    return ApiError(500, f"generation failed: {event.error}", "server_error")


async def stream_events(reply: Reply, ticket: Ticket, events: asyncio.Queue[Event]) -> AsyncIterator[str]:
    """The SSE body of a streamed request; closing it early (the client went away) cancels the request."""
    try:
        if reply.chat:
            yield sse(reply.chunk(role=True))
        while True:
            event = await events.get()
            if event.text:
                yield sse(reply.chunk(event.text))
            if event.finish_reason in ("stop", "length"):
                yield sse(reply.chunk(finish_reason=event.finish_reason))
                if reply.include_usage:
                    yield sse(reply.usage_chunk(event))
                yield DONE
                return
            if event.finish_reason is not None:  # as OpenAI reports an error mid-stream; the stream still ends
                yield sse(_ended_badly(event).body())
                yield DONE
                return
    finally:
        ticket.cancel()  # nothing when it finished; otherwise its KV row is freed at the next step


async def collect(ticket: Ticket, events: asyncio.Queue[Event], request: Request) -> tuple[str, Event] | None:
    """The whole text and final event of a non-streamed request; None when its client went away first."""
    parts = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            parts.append(event.text)
            if event.finish_reason in ("stop", "length"):
                return "".join(parts), event
            if event.finish_reason is not None:
                raise _ended_badly(event)
    finally:
        ticket.cancel()


# -- metrics ----------------------------------------------------------------------------------------------

def prometheus_text(m: EngineMetrics) -> str:
    """Prometheus' text exposition format (version 0.0.4) of the engine's metrics."""
    lines = ["# HELP offload_ready 1 when the model is loaded and serving.", "# TYPE offload_ready gauge",
             f"offload_ready {int(m.state == 'ready')}"]
    for f in dataclasses.fields(m):
        if "metric" in f.metadata:
            kind, help, name = f.metadata["metric"]
            name = name or f"offload_{f.name}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {getattr(m, f.name)}"]
    lines += _labeled("offload_requests_finished_total", "counter", "Requests finished, by finish reason.", "reason",
                      m.requests_finished)
    lines += _labeled("offload_task_matches_total", "counter", "Requests by the task their prompt matched.", "task",
                      m.task_matches)
    if m.pruned_share:
        lines += _labeled("offload_pruned_routing_share", "gauge",
                          "Mean share of a token's routing weight --prune dropped, by model layer.", "layer",
                          m.pruned_share)
    return "\n".join(lines) + "\n"


def _labeled(name: str, kind: str, help: str, label: str, values: Mapping) -> list[str]:
    """One metric family with one sample per label value."""
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}",
            *(f'{name}{{{label}="{k}"}} {v}' for k, v in sorted(values.items()))]


# -- the app ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP side enforces on top of the engine's own limits (context, queue)."""

    model_name: str                      # the id clients must send as ``model``
    api_key: str | None = None           # required as a Bearer token on /v1 when set
    max_request_bytes: int = 4 * 2**20   # larger bodies get a 413 before they are read whole
    max_tokens_default: int = 512        # chat requests without max_tokens (llama-server's -n); completions keep 16
    encode_threads: int = 2              # text is tokenized on these threads, never on the event loop

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_tokens_default", "encode_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"invalid --{name.replace('_', '-')} {value!r}", "give a whole number >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty", "give a non-empty key, or none")


class Api:
    """The routes, bound to one engine and the server's config."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config, self.model_name = engine, config, config.model_name
        self.created = int(time.time())
        self.encoder = ThreadPoolExecutor(config.encode_threads, thread_name_prefix="offload-encode")

    @cached_property
    def template(self) -> ChatTemplate:
        return resolve_chat_template(self.engine.model.plan.path, self.engine.model.plan.metadata)

    @cached_property
    def text_limit(self) -> int:
        """UTF-8 bytes of the longest text that could fit the context: ``context`` tokens of the longest
        token in the vocabulary, 4x for normalizers that shrink text (NFKC folds 3-byte forms into 1-byte
        ones). Longer text cannot fit, so it is refused before the tokenizer spends time and memory on it."""
        vocab = self.engine.model.tokenizer.get_vocab(with_added_tokens=True)
        longest = max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)
        return self.engine.context * longest * TEXT_SLACK

    async def gate(self, request: Request) -> None:
        """/v1's dependency: the API key first (as OpenAI answers 401 before anything else), then readiness."""
        if self.config.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
                message = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer KEY'"
                raise ApiError(401, message, code="invalid_api_key")
        if self.engine.state != "ready":
            raise ApiError(503, f"the model is {self.engine.state}", "server_error", code="model_not_ready")

    async def health(self) -> JSONResponse:
        state = self.engine.state
        if state == "ready":
            return JSONResponse({"status": "ok"})
        body = {"loading": {"status": "loading"}, "stopped": {"status": "stopping"}}.get(
            state, {"status": "error", "error": str(self.engine.error)})
        return JSONResponse(body, status_code=503)

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(self.engine.metrics()), media_type="text/plain; version=0.0.4")

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "offload"}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist (this server serves '{self.model_name}')",
                           param="model", code="model_not_found")

    async def _body(self, request: Request, schema: type[_Generation]) -> _Generation:
        body = parse_body(await read_body(request, self.config.max_request_bytes), schema)
        self._check_model(body.model)
        return body

    async def completions(self, request: Request) -> Response:
        body = await self._body(request, CompletionRequest)
        prompt = await self._completion_prompt(body.prompt)
        return await self._respond(request, body, prompt, COMPLETIONS_DEFAULT_MAX_TOKENS, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request, ChatRequest)
        prompt = await self._encode(lambda: self.template.render(body.messages), "messages", chat=True)
        room = max(self.engine.context - len(prompt), 1)  # a default never overruns the context; an explicit one may
        return await self._respond(request, body, prompt, min(self.config.max_tokens_default, room), chat=True)

    async def _completion_prompt(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt has {len(prompt)} prompts: one per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return await self._encode(lambda: prompt, "prompt", chat=False)
        vocab = self.engine.model.spec.vocab_size
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt must be a non-empty list of token ids in [0, {vocab})", param="prompt")
        return list(prompt)

    async def _encode(self, text: Callable[[], str], param: str, chat: bool) -> list[int]:
        """Token ids of ``text()`` (rendered and) encoded on the encoder threads, so the event loop keeps answering
        everyone; text longer than any that fits the context is refused before the tokenizer sees it."""
        def work() -> list[int]:
            value = text()
            if len(value.encode("utf-8", "surrogatepass")) > self.text_limit:
                raise ContextError(f"the {param} is longer than any text that fits the context of "
                                   f"{self.engine.context} tokens", "shorten it")
            if chat:
                return encode_chat(self.engine.model.tokenizer, value)
            return self.engine.model.encode(value)[0].tolist()

        try:
            return await asyncio.get_running_loop().run_in_executor(self.encoder, work)
        except OffloadError as e:
            raise _offload_error(e, param) from None

    def _sampling(self, body: _Generation, default_max: int) -> SamplingConfig:
        seed = None if body.seed is None else body.seed % SEED_RANGE  # OpenAI's int64 seeds -> torch's uint64
        options: dict[str, Any] = {"max_new_tokens": body.asked_max_tokens or default_max, "top_p": body.top_p,
                                   "top_k": body.top_k, "seed": seed}
        if body.temperature is not None:
            options |= {"do_sample": body.temperature > 0, "temperature": body.temperature or 1.0}
        try:
            return self.engine.model.sampling_config(**options)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    async def _respond(self, request: Request, body: _Generation, prompt: list[int], default_max: int,
                       chat: bool) -> Response:
        generation = GenerationRequest(tuple(prompt), self._sampling(body, default_max), body.stops)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event: Event) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is gone, nobody is listening
                pass

        try:
            ticket = self.engine.submit(generation, deliver)
        except OffloadError as e:
            raise _offload_error(e, "messages" if chat else "prompt") from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        reply = Reply(chat, self.model_name, include_usage and body.stream)
        if body.stream:
            return StreamingResponse(stream_events(reply, ticket, events), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        result = await collect(ticket, events, request)
        if result is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return JSONResponse(reply.whole(*result))


def _error_response(status: int, message: str, type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, type).body(), status_code=status)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine (which loads the model) and stops it at shutdown."""
    api = Api(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)
        api.encoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="offload", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.gate)])
    v1.add_api_route("/models", api.models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", api.model, methods=["GET"])
    v1.add_api_route("/completions", api.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", api.chat_completions, methods=["POST"])
    app.include_router(v1)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGINT / SIGTERM also ends the model's open requests after ``grace`` seconds.

    uvicorn stops accepting, waits for open connections, and after its own timeout cancels them mid-response
    (clients get no final chunk, the log a CancelledError traceback per stream). Here the engine is stopped
    first, after the grace period: each open request gets its final event (a stream: an error chunk and
    ``[DONE]``; a waiting request: a 503), so its connection ends on its own well before uvicorn's timeout,
    which is the grace period plus DRAIN_S."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float) -> None:
        super().__init__(config)
        self.engine, self.grace = engine, grace
        self._stopper: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._stopper is None:
            self._stopper = threading.Timer(self.grace, self.engine.stop)
            self._stopper.daemon = True
            self._stopper.start()


def _uvicorn_config(app: FastAPI, host: str, port: int, grace: float, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + DRAIN_S,
                          access_log=log_level in ("info", "debug", "trace"))


def make_server(engine: Engine, config: ServerConfig, host: str, port: int, grace: float,
                log_level: str = "warning") -> DrainingServer:
    """The HTTP server over ``engine``: run() serves until a signal, then drains as DrainingServer says."""
    server = DrainingServer(_uvicorn_config(create_app(engine, config), host, port, grace, log_level), engine, grace)
    engine.on_fatal = lambda error: setattr(server, "should_exit", True)
    return server


async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) in OpenAI's shape too."""
    return _error_response(error.status_code, str(error.detail))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """A bug, not the client's fault: the traceback goes to the log, the client gets a 500 that says so."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return _error_response(500, "internal error (see the server's log)", "server_error")
