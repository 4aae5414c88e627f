"""Incremental detokenization with stop strings.

Text is released only when it is final: an incomplete UTF-8 sequence (decoded as U+FFFD)
and any tail that could still grow into a stop string are held back. Concatenating the
released pieces therefore gives the final text exactly, and no piece ever contains part
of a stop string.
"""

from __future__ import annotations

class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (stop strings not yet cut)
        self.released = 0  # characters of `text` already returned
        # Unread tokens are decoded together with the previous chunk, so that tokenizers whose
        # output depends on the preceding token (leading spaces, byte fallback) decode right.
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """Append one token; return newly releasable text. Sets `stopped` on a stop string."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release()

    def _release(self) -> str:
        end = len(self.text)
        if self.stop:
            hits = [index for index in (self.text.find(s, self.released) for s in self.stop) if index >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                self.text = self.text[:end]
            else:
                end -= self._stop_prefix_length()
        piece = self.text[self.released:end]
        self.released = end
        return piece

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text) - self.released), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """Release whatever is held back; call once when the request finishes without a stop string."""
        if not self.stopped and self._read_offset < len(self.token_ids):
            tail = self._decode(self.token_ids[self._prefix_offset:])
            head = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            self.text += tail[len(head):]
        piece = self._release() if not self.stopped else ""
        if not self.stopped:
            piece += self.text[self.released:]
            self.released = len(self.text)
        return piece
