"""The serving engine: one thread owns the model and runs continuous batching; other threads only submit.

``offload serve`` gets requests on an asyncio event loop, but a decode step is seconds of blocking torch work
and the model, its KV pool and its expert cache are not safe to share. So one thread loads the model and then
loops: it takes newly submitted requests from a thread-safe inbox into the BatchEngine (runtime/batch.py: requests join
and leave between decode steps, each in its own KV row, the scheduler picking each step's batch), runs a step,
and hands each request's new text to the ``deliver`` callback its submitter gave (the server turns that into
``loop.call_soon_threadsafe``). Nothing else ever touches the model.

- A request is refused at ``submit`` (in the caller's thread, before it queues): prompt + max tokens over the
  context (ContextError), more than ``max_queue`` requests already waiting for a row, or the engine not ready
  (BusyError). So a request that cannot run never stalls the others.
- ``Ticket.cancel()`` (a client that went away) is a flag the engine reads at the next step boundary, where
  the BatchEngine frees the request's KV row; a request still in the inbox is dropped when it is taken.
- Each request's text goes through a TextStream (serve/textstream.py): stop strings end the request in the same
  step (``on_token`` returns True) and are never delivered.
- ``stop()`` ends the loop at the next step boundary and cancels what is left; every request that was accepted
  gets exactly one final event (its ``finish_reason`` set), whatever happens.
- An exception while serving a request (its prefill, sampling, text, or the decode step it was in) ends that
  request with finish reason "error" (runtime/batch.py isolates it); the engine goes on serving the others.
  Only a failure outside any request (loading, a broken cache invariant) stops the engine.
- Counters for ``/metrics`` are published as one frozen snapshot after each step, so a reader on another
  thread never sees the model's stats mid-update.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from offload.errors import BusyError, ConfigError, ContextError, OffloadError
from offload.memory.budget import kv_context
from offload.runtime.batch import BatchEngine, BatchRequest, Completion
from offload.runtime.load import OffloadModel
from offload.runtime.sampling import SamplingConfig
from offload.serve.textstream import TextStream

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25  # an idle engine wakes this often to notice stop(); a submit wakes it at once
# BatchEngine's finish reasons -> OpenAI's: the end-of-sequence token and a stop string are both "stop"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled", "error": "error"}


_NOT_READY = {"loading": "the model is still loading", "stopped": "the server is stopping",
              "failed": "the engine failed and is not serving"}


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asked for, in tokens: the prompt, how to sample, and the strings that end it."""

    prompt: tuple[int, ...]
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Event:
    """A piece of one request's output; the last one has ``finish_reason`` and the token counts."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"; None until the end
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


Deliver = Callable[[Event], None]  # called on the engine thread: must return at once


def _describe(error: Exception | None) -> str:
    """What a client is told of the error that ended its request: a user's fault in words, a bug only as such
    (its traceback goes to the log, not to the client)."""
    if error is None:
        return ""
    if isinstance(error, OffloadError):
        return str(error)
    log.error("a request failed on an internal error", exc_info=error)
    return "internal error while generating (see the server's log)"


class Ticket:
    """A submitted request as its submitter holds it."""

    def __init__(self, request: BatchRequest) -> None:
        self._request = request

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt)

    def cancel(self) -> None:
        """Stop the request at the next step boundary and free its KV row (safe from any thread)."""
        self._request.cancel()


def _metric(default: float, kind: str, help: str, name: str = "") -> Any:
    """A field /metrics exports: Prometheus type, help, and name (default offload_FIELD, + _total for counters)."""
    return field(default=default, metadata={"metric": (kind, help, name)})


@dataclass(frozen=True)
class EngineMetrics:
    """What ``/metrics`` reports: the cache's counters, the engine's, and the budget the model runs with."""

    state: str = "loading"
    expert_slots: int = _metric(0, "gauge", "Expert cache slots: the expert budget the model runs with.")
    total_experts: int = _metric(0, "gauge", "Experts in the checkpoint (all MoE layers).", "offload_experts")
    cache_hits: int = _metric(0, "counter", "Expert accesses served from the cache.")
    cache_misses: int = _metric(0, "counter", "Expert accesses that had to load the expert.")
    cache_evictions: int = _metric(0, "counter", "Experts evicted from the cache.")
    bytes_loaded: int = _metric(0, "counter", "Expert bytes moved into cache slots.",
                                "offload_expert_bytes_loaded_total")
    stall_seconds: float = _metric(0.0, "counter", "Seconds compute waited for expert loads.")
    prefetch_issued: int = _metric(0, "counter", "Expert loads the prefetcher started.")
    prefetch_used: int = _metric(0, "counter", "Prefetched experts used by their layer.")
    prefetch_wasted: int = _metric(0, "counter", "Prefetched experts their layer did not use.")
    prompt_tokens: int = _metric(0, "counter", "Prompt tokens prefilled.")
    tokens_generated: int = _metric(0, "counter", "Tokens generated.")
    decode_steps: int = _metric(0, "counter", "Continuous-batching decode steps run.")
    distinct_experts_per_step: float = _metric(  # per MoE layer, over every forward step
        0.0, "gauge", "Mean distinct experts a step needs per MoE layer.")
    warm_loads: int = _metric(0, "counter", "Experts a request's task pattern loaded before its decode (warm start).")
    warm_hits: int = _metric(0, "counter", "Warm-loaded experts used while resident: misses turned into hits.")
    task_confidence: float = _metric(0.0, "gauge", "Confidence of the latest request's task match (--patterns).")
    requests_running: int = _metric(0, "gauge", "Requests holding a KV cache row.")
    requests_waiting: int = _metric(0, "gauge", "Accepted requests waiting for a KV cache row.")
    requests_finished: Mapping[str, int] = field(default_factory=dict)  # by finish reason
    task_matches: Mapping[str, int] = field(default_factory=dict)  # requests by matched task (--patterns)
    pruned_share: Mapping[int, float] = field(default_factory=dict)  # by MoE layer: routing weight --prune dropped


@dataclass(eq=False)
class _Live:
    """An accepted request on the engine side: its batch state, its text, and where its events go."""

    request: BatchRequest
    stream: TextStream
    deliver: Deliver
    admitted: bool = False


class Engine:
    """Loads a model on its own thread, then serves submitted requests with continuous batching."""

    def __init__(self, load: Callable[[], OffloadModel], max_queue: int = 64,
                 on_ready: Callable[[OffloadModel], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        if max_queue < 1:
            raise ConfigError(f"invalid --max-queue {max_queue}", "give a whole number >= 1")
        self._load, self.max_queue = load, max_queue
        self.on_ready, self.on_fatal = on_ready, on_fatal  # may be set until start()
        self.model: OffloadModel | None = None
        self.context = 0
        self.error: BaseException | None = None
        self._state = "loading"
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue[_Live | None] = queue.SimpleQueue()
        self._live: dict[BatchRequest, _Live] = {}
        self._ids = itertools.count()
        self._pending = self._running = self._tokens = self._prompt_tokens = 0
        self._finished: Counter[str] = Counter()
        self._metrics = EngineMetrics()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._batch: BatchEngine | None = None
        self._thread = threading.Thread(target=self._main, name="offload-engine", daemon=True)

    # -- any thread ----------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """"loading", "ready", "failed" (see ``error``) or "stopped"."""
        return self._state

    def start(self) -> Engine:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """Block until the model is loaded (True) or ``timeout`` seconds pass / loading fails (False)."""
        self._ready.wait(timeout)
        return self._state == "ready"

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop at the next step boundary; requests still running get a "cancelled" final event."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, deliver: Deliver) -> Ticket:
        """Queue a request; ``deliver`` then gets its events on the engine thread. Raises ContextError or
        BusyError (nothing is queued then)."""
        prompt, new = len(request.prompt), request.sampling.max_new_tokens
        if not prompt:
            raise ConfigError("the prompt encodes to no tokens", "give a non-empty prompt")
        if self._state != "ready":
            raise BusyError(_NOT_READY[self._state], "retry when /health says ok")
        if prompt + new > self.context:
            raise ContextError(f"the prompt's {prompt} tokens + max_tokens {new} exceed the context of "
                               f"{self.context} tokens", "shorten the prompt or lower max_tokens")
        live = self._make_live(request, deliver)  # anything that can fail is done before the request is counted
        with self._lock:
            if self._state != "ready":
                raise BusyError(_NOT_READY[self._state], "retry when /health says ok")
            if self._pending >= self.max_queue:
                raise BusyError(f"{self._pending} requests are already waiting (the queue limit, --max-queue)",
                                "retry later")
            self._pending += 1
            self._inbox.put(live)
        return Ticket(live.request)

    def metrics(self) -> EngineMetrics:
        with self._lock:
            return dataclasses.replace(self._metrics, state=self._state, requests_running=self._running,
                                       requests_waiting=self._pending)

    def _make_live(self, request: GenerationRequest, deliver: Deliver) -> _Live:
        model = self.model
        batch_request = BatchRequest(list(request.prompt), request.sampling,
                                     Completion(next(self._ids), None, len(request.prompt)),
                                     request.sampling.make_generator(model.device))
        live = _Live(batch_request, TextStream(lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True),
                                               request.stop), deliver)
        batch_request.on_token = lambda completion, token: self._on_token(live, token)
        return live

    # -- the engine thread ---------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._setup(self._load())
            with torch.inference_mode():
                self._loop()
        except Exception as e:  # noqa: BLE001 - reported to every client and to on_fatal, then the engine ends
            self._fail(e)
        finally:
            self._close()

    def _setup(self, model: OffloadModel) -> None:
        config = model.batch_config()
        self.model, self.context = model, kv_context(model.spec, model.runtime.context)
        self._batch = BatchEngine(model.model, config, config.pool, self.context)
        with self._lock:
            self._state = "ready"
        self._publish()
        self._ready.set()
        if self.on_ready:
            self.on_ready(model)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._take_inbox(block=not self._batch.busy)
            if self._batch.busy and not self._stopping.is_set():
                for r in self._batch.step():
                    self._finish(r)
                self._publish()

    def _take_inbox(self, block: bool) -> None:
        try:
            live = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while live is not None:
                self._live[live.request] = live
                try:
                    self._batch.submit(live.request)  # a cancelled one is dropped at the next step
                except OffloadError as e:  # submit() checked it already; should the batch refuse it, it ends
                    live.request.error = e
                    live.request.completion.finish_reason = "error"
                    self._finish(live.request)
                live = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _on_token(self, live: _Live, token: int) -> bool:
        """BatchEngine's per-token callback: deliver the new text; True ends the request (a stop string)."""
        if not live.admitted:  # its first token: the prompt was prefilled into a row
            live.admitted = True
            with self._lock:
                self._pending -= 1
                self._running += 1
                self._prompt_tokens += len(live.request.prompt)
        self._tokens += 1
        delta, stopped = live.stream.push(token)
        if delta:
            live.deliver(Event(delta))
        return stopped

    def _finish(self, r: BatchRequest) -> None:
        live = self._live.pop(r)
        self._release(live)
        reason = FINISH_REASONS[r.completion.finish_reason]
        self._finished[reason] += 1
        tail = live.stream.finish() if reason in ("stop", "length") else ""
        live.deliver(Event(tail, reason, len(r.prompt), r.completion.completion_tokens, _describe(r.error)))

    def _release(self, live: _Live) -> None:
        with self._lock:
            if live.admitted:
                self._running -= 1
            else:
                self._pending -= 1

    def _publish(self) -> None:
        stats, cache = self.model.stats, self.model.cache
        t = stats.total
        snapshot = EngineMetrics(
            expert_slots=cache.num_slots, total_experts=self.model.spec.total_experts, cache_hits=t.hits,
            cache_misses=t.misses, cache_evictions=t.evictions, bytes_loaded=t.bytes_loaded,
            stall_seconds=t.stall_time_s, prefetch_issued=t.prefetch_issued, prefetch_used=t.prefetch_used,
            prefetch_wasted=t.prefetch_wasted, prompt_tokens=self._prompt_tokens, tokens_generated=self._tokens,
            decode_steps=self._batch.steps, distinct_experts_per_step=t.distinct_per_step,
            warm_loads=t.warm_loads, warm_hits=t.warm_hits, task_confidence=stats.task.confidence,
            requests_finished=dict(self._finished), task_matches=dict(stats.task.matches),
            pruned_share={i: s.pruned_share for i, s in stats.layers.items() if s.pruned_tokens})
        with self._lock:
            self._metrics = snapshot

    def _fail(self, error: BaseException) -> None:
        if not isinstance(error, OffloadError):  # a user's fault is one line at the CLI; anything else is a bug
            log.error("the engine stopped on an error", exc_info=error)
        self.error = error
        with self._lock:
            self._state = "failed"
        self._end_all("error", str(error))
        if self.on_fatal:
            self.on_fatal(error)

    def _close(self) -> None:
        with self._lock:  # from here on submit() refuses, so nothing lands in the inbox unanswered
            if self._state != "failed":
                self._state = "stopped"
        self._end_all("cancelled", "")
        if self._batch is not None:
            self._batch.close()
        self._ready.set()

    def _end_all(self, reason: str, error: str) -> None:
        """The final event for every request still live or queued (the loop will not run them)."""
        while True:
            try:
                live = self._inbox.get_nowait()
            except queue.Empty:
                break
            if live is not None:
                self._live[live.request] = live
        for live in list(self._live.values()):
            self._release(live)
            self._finished[reason] += 1
            live.deliver(Event(finish_reason=reason, prompt_tokens=len(live.request.prompt),
                               completion_tokens=live.request.completion.completion_tokens, error=error))
        self._live.clear()
