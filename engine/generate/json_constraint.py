"""JSON-constrained output: a character-level validator of JSON prefixes (RFC 8259) and the
token choice that keeps an answer a valid prefix until the value is complete.

The answer must be one JSON object or array (what "JSON mode" asks for), leading whitespace
allowed. `JsonPrefix.feed(text)` returns the state after `text`, or None when `text` cannot
continue a valid document; `complete` tells when the top-level value is closed. Tokens are
tried best first (greedy) or sampled with the invalid ones masked out, so the model's own
preferences decide among the valid continuations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

WHITESPACE = " \t\n\r"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
NUMBER_CHARS = "0123456789+-.eE"


class JsonPrefix:
    """Where a JSON document stands after some text. Immutable: `feed` returns a new one."""

    __slots__ = ("_number", "_pending", "_stack", "_state", "complete")

    def __init__(self) -> None:
        self._stack: tuple[str, ...] = ()  # "{" / "[" per open container
        self._state = "start"
        self._pending = ""  # rest of a literal, or "\\u" hex digits left
        self._number = ""
        self.complete = False

    def _copy(self) -> JsonPrefix:
        other = JsonPrefix.__new__(JsonPrefix)
        other._stack, other._state = self._stack, self._state
        other._pending, other._number = self._pending, self._number
        other.complete = self.complete
        return other

    def feed(self, text: str) -> JsonPrefix | None:
        state = self._copy()
        for char in text:
            if not state._step(char):
                return None
        return state

    # -- the automaton -----------------------------------------------------------------

    def _after_value(self) -> str:
        if not self._stack:
            self.complete = True
            return "done"
        return "obj_next" if self._stack[-1] == "{" else "arr_next"

    def _number_valid(self, number: str) -> bool:
        """Whether `number` is a prefix of a JSON number."""
        i, n = 0, len(number)
        if i < n and number[i] == "-":
            i += 1
        if i == n:
            return True
        if number[i] == "0":
            i += 1
        elif number[i].isdigit():
            while i < n and number[i].isdigit():
                i += 1
        else:
            return False
        if i < n and number[i] == ".":
            i += 1
            start = i
            while i < n and number[i].isdigit():
                i += 1
            if i == n:
                return True
            if i == start:
                return False
        if i < n and number[i] in "eE":
            i += 1
            if i < n and number[i] in "+-":
                i += 1
            while i < n and number[i].isdigit():
                i += 1
        return i == n

    def _number_done(self, number: str) -> bool:
        return self._number_valid(number) and number[-1].isdigit()

    def _start_value(self, char: str) -> bool:
        if char == "{":
            self._stack += ("{",)
            self._state = "obj_first"
        elif char == "[":
            self._stack += ("[",)
            self._state = "arr_first"
        elif not self._stack:
            return False  # the top level is an object or an array
        elif char == '"':
            self._state = "string"
        elif char in LITERALS:
            self._state, self._pending = "literal", LITERALS[char]
        elif char == "-" or char.isdigit():
            self._state, self._number = "number", char
        else:
            return False
        return True

    def _step(self, char: str) -> bool:
        state = self._state
        if state == "number":
            if char in NUMBER_CHARS:
                if not self._number_valid(self._number + char):
                    return False
                self._number += char
                return True
            if not self._number_done(self._number):
                return False
            self._state = self._after_value()
            return self._step(char)
        if state in ("string", "key"):
            if char == '"':
                self._state = "colon" if state == "key" else self._after_value()
            elif char == "\\":
                self._state = state + "_escape"
            elif ord(char) < 0x20:
                return False
            return True
        if state in ("string_escape", "key_escape"):
            base = state.removesuffix("_escape")
            if char == "u":
                self._state, self._pending = base + "_hex", "4"
            elif char in '"\\/bfnrt':
                self._state = base
            else:
                return False
            return True
        if state in ("string_hex", "key_hex"):
            if char not in "0123456789abcdefABCDEF":
                return False
            left = int(self._pending) - 1
            self._pending = str(left)
            if left == 0:
                self._state = state.removesuffix("_hex")
            return True
        if state == "literal":
            if not self._pending or char != self._pending[0]:
                return False
            self._pending = self._pending[1:]
            if not self._pending:
                self._state = self._after_value()
            return True
        if char in WHITESPACE:
            return True
        if state in ("start", "value"):
            return self._start_value(char)
        if state == "done":
            return False
        if state in ("obj_first", "obj_key"):
            if char == '"':
                self._state = "key"
                return True
            if char == "}" and state == "obj_first":
                return self._close("{")
            return False
        if state == "colon":
            if char == ":":
                self._state = "value"
                return True
            return False
        if state == "obj_next":
            if char == ",":
                self._state = "obj_key"
                return True
            return char == "}" and self._close("{")
        if state == "arr_first":
            if char == "]":
                return self._close("[")
            self._state = "value"
            return self._start_value(char)
        if state == "arr_next":
            if char == ",":
                self._state = "value"
                return True
            return char == "]" and self._close("[")
        return False

    def _close(self, opener: str) -> bool:
        if not self._stack or self._stack[-1] != opener:
            return False
        self._stack = self._stack[:-1]
        self._state = self._after_value()
        return True


def choose_token(
    logits: NDArray[np.float32],
    draw: Callable[[NDArray[np.float32]], int],
    state: JsonPrefix,
    token_text: Callable[[int], str],
    attempts: int = 64,
) -> tuple[int, JsonPrefix] | None:
    """The token `draw` picks among those that keep `state` a valid prefix, and the state
    after it (None when no tried token does): up to `attempts` draws with each rejected
    token masked out, then the remaining tokens best first."""
    masked = logits.copy()
    for _ in range(attempts):
        token = draw(masked)
        after = state.feed(token_text(token))
        if after is not None and token_text(token):
            return token, after
        masked[token] = -np.inf
    for token in np.argsort(-masked, kind="stable")[:4096]:
        if not np.isfinite(masked[token]):
            break
        text = token_text(int(token))
        after = state.feed(text) if text else None
        if after is not None:
            return int(token), after
    return None
