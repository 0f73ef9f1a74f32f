"""Incremental detokenization with stop strings, safe for streaming.

Text is decoded from a few prompt tokens plus everything generated, then the prompt part is cut
off: SentencePiece tokenizers drop a leading space when a token is decoded on its own. Text that
might still turn into a stop string, or ends in half a UTF-8 character, is held back until the
next token settles it, so a stream never shows text that the final answer does not contain.
"""

from __future__ import annotations

from typing import Any

PREFIX_TOKENS = 4  # prompt tokens decoded in front of the output to get word boundaries right
REPLACEMENT_CHAR = "\ufffd"  # what an incomplete multi-byte character decodes to


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas and reports the first stop string hit."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self._tok = tokenizer
        self._prefix = list(prompt_ids[-PREFIX_TOKENS:])
        self._prefix_text = self._decode(self._prefix)
        self._ids: list[int] = []
        self._stop = [s for s in stop if s]
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _full_text(self) -> str:
        full = self._decode(self._prefix + self._ids)
        if full.startswith(self._prefix_text):
            return full[len(self._prefix_text):]
        return self._decode(self._ids)

    def _held_back(self, text: str) -> int:
        """How many trailing characters could still be the start of a stop string."""
        hold = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly settled text (possibly empty)."""
        self._ids.append(token_id)
        text = self._full_text()
        # Search for stops only where a new match can start.
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(text[: min(hits)])
        end = len(text) - self._held_back(text)
        if text[:end].endswith(REPLACEMENT_CHAR):
            end -= 1
        return self._emit(text[:end])

    def flush(self) -> str:
        """The rest of the text when the sequence ends for a reason other than a stop string."""
        if self.stopped:
            return ""
        return self._emit(self._full_text())

    def _emit(self, settled: str) -> str:
        if len(settled) <= len(self.text) or not settled.startswith(self.text):
            return ""
        delta = settled[len(self.text):]
        self.text = settled
        return delta
