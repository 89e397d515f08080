"""Incremental detokenization with stop strings.

Streaming must never take back text it has sent: we hold back a trailing partial UTF-8 character (decoded as
U+FFFD) and any tail that could still become a stop string, and emit the rest.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the completion already handed out
        self.stopped = False

    def resume(self, token_ids: list[int], chars_sent: int) -> None:
        """Continue a stream begun elsewhere: ``token_ids`` were generated, ``chars_sent`` characters delivered."""
        self.token_ids = list(token_ids)
        text = self.decode()
        if not 0 <= chars_sent <= len(text):
            raise ValueError(f"{chars_sent} characters were sent, but the tokens decode to {len(text)}")
        self.emitted = chars_sent

    def decode(self) -> str:
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a generated token; return newly safe text. Sets ``stopped`` when a stop string appeared."""
        self.token_ids.append(token_id)
        text = self.decode()
        if self._stop:
            start = max(0, self.emitted - self._longest_stop)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._advance(text[: min(hits)], len(text[: min(hits)]))
        stable = text.rstrip(REPLACEMENT)
        return self._advance(stable, len(stable) - self._held_for_stop(stable))

    def finish(self) -> str:
        """The rest of the text once generation ends (held-back characters included, unless a stop string hit)."""
        if self.stopped:
            return ""
        text = self.decode()
        return self._advance(text, len(text))

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _advance(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = text[self.emitted:end]
        self.emitted = end
        return delta
