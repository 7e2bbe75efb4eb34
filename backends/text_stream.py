"""Engine-independent pieces of streaming: incremental detokenization and stop strings."""
from __future__ import annotations

from typing import Callable, Sequence


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without emitting half a UTF-8 character.

    Only a short window is decoded per token (the tokens since the last emitted text, plus the ones
    before them as context so leading spaces come out right), not the whole reply every time."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0   # start of the context window
        self._read = 0     # tokens before this are already emitted
        self._text: list[str] = []

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        now = self._decode(self._ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self._text.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._text)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else -1


class StopStringFilter:
    """Holds back text that might be the start of a stop string, so a stop string is never shown."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self._keep = max((len(s) - 1 for s in self.stops), default=0)

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return delta, False
        self.pending += delta
        cut = find_stop(self.pending, self.stops)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        safe = len(self.pending) - self._keep
        if safe <= 0:
            return "", False
        out, self.pending = self.pending[:safe], self.pending[safe:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
