"""Stop strings, held-back text and finish reasons on a Sequence, with a character-level detokenizer."""

from __future__ import annotations

from mistralrs_py.engine.request import Request, SamplingParams
from mistralrs_py.engine.sequence import Sequence, find_stop, held_back


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


def test_find_stop_and_held_back():
    assert find_stop("hello world", ("wor", "lo"), 0) == (3, "lo")
    assert find_stop("hello", ("x",), 0) is None
    assert held_back("abc</", ("</s>",)) == 2
    assert held_back("abc", ("</s>",)) == 0
    assert held_back("ab<", ("<<x", "<y")) == 1


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
