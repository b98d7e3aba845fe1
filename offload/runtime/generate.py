"""generate(): prefill, decode loop and stopping, in the transformers habit; tokens are chosen by sampling.sample()."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

import torch

from offload.errors import ConfigError, ContextError
from offload.model.forward import MoEModel, RouteCollector
from offload.model.kv import KVCache
from offload.runtime.sampling import SamplingConfig, sample
from offload.spec import ModelSpec


class Streamer(Protocol):
    """transformers' streamer protocol: put() gets the prompt first, then each new token batch."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """Writes decoded text as tokens arrive (batch 1), holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, out: TextIO | None = None, skip_prompt: bool = True) -> None:
        self.tokenizer = tokenizer
        self._out = out
        self.skip_prompt = skip_prompt
        self._prompt_seen = False
        self._ids: list[int] = []
        self._printed = 0

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                return
        self._ids.extend(ids)
        self._flush(final=False)

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout  # looked up late, so redirected stdout (tests, pipes) is honoured

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # a multi-byte character is split across tokens: wait for the rest
        self.out.write(text[self._printed :])
        self.out.flush()
        self._printed = len(text)

    def end(self) -> None:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, spec: ModelSpec,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask as long tensors on ``device``, or a one-line error naming the argument at fault."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ConfigError(f"input_ids must be a [batch, length] tensor with at least one row and one token, got "
                          f"{shape}", "pass a 2-D LongTensor, e.g. model.encode(text)")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must hold integer token ids, got {input_ids.dtype}", "pass a LongTensor")
    check_token_ids(input_ids.reshape(-1).tolist(), spec.vocab_size, "input_ids")
    ids = input_ids.to(device=device, dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != ids.shape:
        raise ConfigError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}",
                          "pass one mask entry per token")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ConfigError("attention_mask must hold only 0 (padding) and 1 (token)", "pass a 0/1 mask")
    empty = (mask.sum(-1) == 0).nonzero().reshape(-1).tolist()
    if empty:
        raise ConfigError(f"attention_mask row {empty[0]} is all zeros: that row has no token to continue",
                          "drop the row, or mark its tokens with 1")
    return ids, mask


def check_token_ids(ids: list[int], vocab_size: int, what: str) -> None:
    """Every id a row of the embedding: a ConfigError naming ``what`` and the first id outside [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ConfigError(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab_size})",
                          "encode with this model's tokenizer")


def max_positions(spec: ModelSpec) -> int:
    """The longest sequence the model is made for: max_position_embeddings, or what a scaled RoPE stretches its
    original context to (YaRN / linear: original x factor, as vLLM derives its max_model_len)."""
    rope = spec.rope
    if rope.kind == "default":
        return spec.max_position_embeddings
    return max(spec.max_position_embeddings, int((rope.original_max_positions or spec.max_position_embeddings)
                                                 * rope.factor))


def check_length(spec: ModelSpec, prompt_tokens: int, max_new_tokens: int) -> None:
    """A sequence must fit the model's positions: checked before its KV cache is allocated (max_new_tokens=10**12
    is this one line, not a 256 TB allocation)."""
    if prompt_tokens + max_new_tokens > max_positions(spec):
        raise ContextError(f"the prompt's {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceed the "
                           f"model's {max_positions(spec)} positions (max_position_embeddings)",
                           "shorten the prompt or lower max_new_tokens")


def _record_time(stats, first: bool, tokens: int, elapsed: float) -> None:
    """The first forward of a generate() call is prefill, the rest decode."""
    if first:
        stats.prefill_tokens += tokens
        stats.prefill_time_s += elapsed
    else:
        stats.decode_tokens += tokens
        stats.decode_time_s += elapsed


class _PromptRoutes:
    """Collects the prompt's routing during prefill for the model's request hook (task patterns), then hands it
    over before the first decode step; without a hook it does nothing."""

    def __init__(self, model: MoEModel) -> None:
        self.model = model
        self.collector = RouteCollector() if model.request_hook is not None else None
        if self.collector is not None:
            model.route_observers.append(self.collector)

    def prefilled(self) -> None:
        if self.collector is not None:
            self.close()
            self.model.request_hook.prefilled(self.collector.take())

    def close(self) -> None:
        if self.collector in self.model.route_observers:
            self.model.route_observers.remove(self.collector)


@torch.inference_mode()
def generate(
    model: MoEModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    streamer: Streamer | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy or sampled continuation of a left-padded batch; returns [batch, prompt + new] ids."""
    sampling = sampling or SamplingConfig()
    device = model.device
    ids, mask = _check_inputs(input_ids, attention_mask, model.spec, device)
    batch, prompt_len = ids.shape
    check_length(model.spec, prompt_len, sampling.max_new_tokens)
    model.cache.check()  # nothing pinned or half-loaded is left from an earlier, interrupted call
    generator = generator or sampling.make_generator(device)
    eos = torch.tensor(sampling.eos_token_ids, device=device)
    kv = KVCache(model.spec, batch, prompt_len + sampling.max_new_tokens, model.dtype, device, model.layer_stores)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(ids.cpu())
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    step_ids, step_pos = ids, position
    prompt_routes = _PromptRoutes(model)
    try:
        for step in range(sampling.max_new_tokens):
            start = time.perf_counter()
            logits = model.forward(step_ids, mask, step_pos, kv, last_only=True)[:, -1]
            next_ids = sample(logits, sampling, generator).masked_fill(finished, sampling.pad)
            _record_time(model.stats, step == 0, int(mask.sum()) if step == 0 else batch, time.perf_counter() - start)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_ids.cpu())
            finished |= torch.isin(next_ids, eos)
            if bool(finished.all()):
                break
            if step == 0:
                prompt_routes.prefilled()  # after the prompt has routed, before the first decode step
            step_ids = next_ids[:, None]
            step_pos = (mask.sum(-1, keepdim=True) - 1)
    finally:
        prompt_routes.close()
    if streamer is not None:
        streamer.end()
    return ids
