"""Token ids out -> text out, per request: detokenising, undoing prompt healing, stop strings and
holding back what may still change (a stop string's possible start, an incomplete UTF-8 sequence)."""
from __future__ import annotations

from .healing import unheal


class TextStream:
    """The text of one request as its committed prefix grows. `update` returns the delta that is
    safe to show; nothing shown is ever taken back."""

    def __init__(self, tokenizer, heal: str = "", stop: tuple[str, ...] = ()):
        self.tokenizer, self.heal, self.stop = tokenizer, heal, stop
        self.emitted = 0  # characters already streamed
        self._hold = max((len(x) for x in stop), default=1) - 1

    def text(self, ids: list[int]) -> str:
        """The generated text of these ids, relative to the prompt the user gave."""
        return unheal(self.tokenizer.decode(ids, skip_special=True), self.heal)

    def stop_cut(self, text: str) -> str | None:
        """The text cut before the first stop string in it, or None when there is none."""
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                return text[:at]
        return None

    def delta(self, text: str) -> str:
        """The part of `text` (not yet finished) that is safe to stream now."""
        safe = len(text) - self._hold
        while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for the rest
            safe -= 1
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def finish(self, ids: list[int], cut: str | None = None) -> tuple[str, str, list[int]]:
        """(last delta, final text, final ids). cut: the text a stop string ended; the ids are then
        re-encoded from what the model wrote up to the cut (the healed whitespace it rewrote, then
        the cut text), not the ids it went on to write."""
        raw = self.tokenizer.decode(ids, skip_special=True)
        full = unheal(raw, self.heal)
        text = full if cut is None else cut
        if text != full:
            written = raw[: len(raw) - len(full)] + text
            ids = self.tokenizer.encode(written, allow_special=False) if written else []
        delta = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = len(text)
        return delta, text, ids
