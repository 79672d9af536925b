"""`TextStream`: a sequence's new tokens as text deltas, cut at stop strings, whole characters only."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"   # what a tokenizer decodes a UTF-8 sequence cut mid-character to


class TextStream:
    """Decodes the whole output each time (robust to tokenizers whose decoding is not per-token) and
    hands out only what can no longer change: no trailing half character, and no tail that could
    still grow into a stop string. Once a stop string appears, the text ends right before it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, stops
        self.emitted = ""

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """The new delta for the output so far, and whether a stop string ended it."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._advance(text[:min(hits)]), True
        safe = text.rstrip(REPLACEMENT)
        hold = max((n for s in self.stops for n in range(1, len(s)) if safe.endswith(s[:n])), default=0)
        return self._advance(safe[:len(safe) - hold]), False

    def finish(self, token_ids: list[int]) -> str:
        """The rest of the text when the sequence ends for another reason than a stop string."""
        return self._advance(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""   # never take back what was sent
        delta, self.emitted = text[len(self.emitted):], text
        return delta
