"""generate(): prefill, decode loop, sampling and stopping, in the transformers habit."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

import torch

from .errors import ConfigError
from .model import KVCache, MoEModel


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


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p), in transformers' order. logits: [batch, vocab] float32."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def _check_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError("input_ids must be a [batch, length] tensor with at least one token", "pass a 2-D LongTensor")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}", "pass a non-negative number")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}", "use do_sample=False for greedy decoding")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}", "1.0 disables nucleus sampling")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}", "0 disables top-k filtering")


@torch.inference_mode()
def generate(
    model: MoEModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Streamer | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy or sampled continuation of a left-padded batch; returns [batch, prompt + new] ids."""
    _check_args(input_ids, max_new_tokens, temperature, top_p, top_k)
    device = model.device
    ids = input_ids.to(device=device, dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != ids.shape:
        raise ConfigError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}",
                          "pass one mask entry per token")
    eos = torch.tensor([] if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    batch, prompt_len = ids.shape
    kv = KVCache(model.spec, batch, prompt_len + max_new_tokens, model.dtype, device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(ids.cpu())
    stats = model.stats
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    step_ids, step_pos = ids, position
    for step in range(max_new_tokens):
        start = time.perf_counter()
        logits = model.forward(step_ids, mask, step_pos, kv, last_only=True)[:, -1].float()
        if do_sample:
            probs = _filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_ids = logits.argmax(dim=-1)
        next_ids = next_ids.masked_fill(finished, pad)
        elapsed = time.perf_counter() - start
        if step == 0:
            stats.prefill_tokens += int(mask.sum())
            stats.prefill_time_s += elapsed
        else:
            stats.decode_tokens += batch
            stats.decode_time_s += elapsed
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_ids.cpu())
        finished |= torch.isin(next_ids, eos)
        if bool(finished.all()):
            break
        step_ids = next_ids[:, None]
        step_pos = (mask.sum(-1, keepdim=True) - 1)
    if streamer is not None:
        streamer.end()
    return ids
