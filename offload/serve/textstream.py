"""A request's text as its tokens arrive: what may be sent now, and where a stop string ends it.

OpenAI's ``stop``: generation ends where the text would contain one of the strings, and the string is not
returned. Stop strings are text, not tokens: one may span several tokens, or sit inside one. So each token's
text is decoded, and text that could still turn into a stop string (a suffix that is a prefix of one) is held
back until the next token decides, as is a trailing incomplete UTF-8 sequence (the tokenizer decodes it as
U+FFFD until its last byte arrives). Everything sent is final: the pieces add up to the whole text.

The whole sequence is decoded each time, as generate.TextStreamer (``offload run``) does, so the streamed text
equals ``tokenizer.decode(ids, skip_special_tokens=True)`` at the end; decoding is the tokenizer's Rust code
and costs microseconds next to one decode step of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index where the earliest stop string begins in ``text[start:]``, or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (0: none)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """The text of one growing token sequence, cut at the first stop string.

    ``push(token)`` returns ``(text to send now, stopped)``; ``finish()`` returns what was held back once the
    sequence ends for another reason (end of sequence, length, cancellation). ``text`` is all that was sent.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._decode = decode
        self.stops = tuple(stops)
        self._longest = max(map(len, self.stops), default=0)
        self._ids: list[int] = []
        self._decoded = ""
        self._sent = 0  # characters of the decoded text already returned
        self.stopped = False

    @property
    def text(self) -> str:
        return self._decoded[: self._sent]

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._ids.append(token)
        text = self._decode(self._ids)
        self._decoded = text
        # a stop string may begin in the held-back tail, never in what was already sent
        cut = find_stop(text, self.stops, max(0, self._sent - self._longest + 1)) if self.stops else None
        if cut is not None:
            self.stopped = True
            return self._advance(max(cut, self._sent)), True
        settled = text.rstrip(REPLACEMENT)  # a split character's bytes are not text yet
        safe = len(settled) - partial_stop(settled, self.stops)
        return self._advance(max(safe, self._sent)), False

    def finish(self) -> str:
        """The held-back rest, when the sequence ends without reaching a stop string."""
        return "" if self.stopped else self._advance(len(self._decoded))

    def _advance(self, end: int) -> str:
        delta = self._decoded[self._sent : end]
        self._sent = end
        if self.stopped:
            self._decoded = self._decoded[:end]
        return delta
