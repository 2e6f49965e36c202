"""Stop strings, held-back text and finish reasons on a Sequence, with a character-level detokenizer."""

from __future__ import annotations

import random

from mistralrs_py.engine.request import Request, SamplingParams
from mistralrs_py.engine.sequence import Sequence
from mistralrs_py.engine.stops import StopStrings


class CharDetok:
    """Token id i decodes to chr(i)."""

    def add(self, t):
        return chr(t)

    def flush(self):
        return ""


def seq(**kw):
    return Sequence(Request("r", [1, 2], SamplingParams(**kw), lambda e: None), 0, CharDetok())


def feed(s, text, eos=(3,)):
    out = ""
    for ch in text:
        s.append(ord(ch), 1000, list(eos))
        out += s.take_delta()
        if s.status.is_finished:
            break
    return out


def brute_first_stop(text: str, stops) -> tuple[int, str] | None:
    """The reference: the first character at which some stop string ends; the longest such one."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            best = max(done, key=len)
            return end - len(best), best
    return None


def brute_held(text: str, stops) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_the_stop_matcher_agrees_with_brute_force_on_random_text():
    rng = random.Random(0)
    for _ in range(400):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        m = StopStrings(stops).matcher()
        got, fed = None, ""
        pieces = []
        i = 0
        while i < len(text):  # random delta sizes, as tokens decode to 1..4 characters
            n = rng.randint(1, 4)
            pieces.append(text[i : i + n])
            i += n
        for piece in pieces:
            got = m.feed(piece)
            if got is not None:
                break
            fed += piece
            assert m.held() == brute_held(fed, stops), (stops, fed)
        assert got == brute_first_stop(text, stops), (stops, text)


def test_held_back_text_examples():
    m = StopStrings(("</s>",)).matcher()
    assert m.feed("abc</") is None and m.held() == 2
    m = StopStrings(("<<x", "<y")).matcher()
    assert m.feed("ab<") is None and m.held() == 1
    m = StopStrings(("wor", "lo")).matcher()
    assert m.feed("hello world") == (3, "lo")


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    s = seq(stop=("END",))
    streamed = feed(s, "abcENDxyz")
    assert s.text == "abc" and streamed == "abc"
    assert s.finish_reason == "stop" and s.stop_reason == "END"


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    s = seq(stop=("END",), max_tokens=6)
    streamed = feed(s, "abENxy")
    assert streamed == "abENxy" and s.finish_reason == "length"


def test_eos_and_stop_token_ids_finish_without_text():
    s = seq()
    s.append(ord("a"), 1000, [3])
    s.append(3, 1000, [3])
    assert s.finish_reason == "stop" and s.stop_reason == 3 and s.text == "a"
    s = seq(stop_token_ids=(ord("z"),))
    assert feed(s, "xyz") == "xy" and s.finish_reason == "stop"
    s = seq(ignore_eos=True, max_tokens=2)
    s.append(3, 1000, [3])
    assert not s.status.is_finished


def test_context_full_is_length():
    s = seq()
    s.append(ord("a"), 4, [3])
    assert not s.status.is_finished
    s.append(ord("b"), 4, [3])
    assert s.finish_reason == "length"
