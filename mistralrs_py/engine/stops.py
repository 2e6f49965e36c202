"""Stop strings matched as text streams in: each new character advances one KMP automaton per stop
string, so a token costs the same whether 10 or 100,000 characters were generated before it.

`StopStrings` (the failure tables) is built once per request; each sequence keeps a `StopMatcher`
(one integer per stop string: how much of it the text ends with). The longest such partial match is
the text held back from streaming, since it may still become a stop string.
"""

from __future__ import annotations

from array import array


def failure_table(s: str) -> array:
    """KMP: fail[i] = length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    fail = array("l", [0]) * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopStrings:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.tables = [failure_table(s) for s in stops]

    def matcher(self) -> "StopMatcher":
        return StopMatcher(self)


class StopMatcher:
    def __init__(self, strings: StopStrings):
        self.strings = strings
        self.state = [0] * len(strings.stops)  # characters of each stop string the text ends with
        self.fed = 0  # characters fed so far

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advances over `text`; at the first character where a stop string completes, returns
        (the position in everything fed where that stop string starts, the stop string).

        NOTE: the earliest *end* wins (the text is cut as soon as a stop string is complete, so no
        character after it is ever needed); among stop strings ending at the same character, the
        longest (the earliest start)."""
        stops, tables, state = self.strings.stops, self.strings.tables, self.state
        for ch in text:
            self.fed += 1
            hit = None
            for j, s in enumerate(stops):
                k, fail = state[j], tables[j]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    if hit is None or len(s) > len(hit):
                        hit = s
                    k = fail[k - 1]
                state[j] = k
            if hit is not None:
                return self.fed - len(hit), hit
        return None

    def held(self) -> int:
        """Characters at the end of the text that may still become a stop string."""
        return max(self.state, default=0)
