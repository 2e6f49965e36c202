"""Reading tool calls back from a model's text, streamed or whole (the formats: tool_formats.py).

parser = ToolCallParser(HERMES, {"get_weather"}, incremental=False)
for piece in parser.feed(text_delta): ...          # Content(text) | CallStart(index, id, name) | Arguments(index, text)
parser.finish()                                    # what was held back; an unfinished call becomes content
                                                   # (incremental: it keeps what was sent, markup is dropped)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from .tool_formats import LLAMA3_JSON, PYTHON_TAG, ToolFormat, new_call_id


# ---- parsing what the model wrote ------------------------------------------------------------------
@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class Arguments:
    index: int
    text: str


Piece = Union[Content, CallStart, Arguments]

_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_WAIT, _FAIL = "wait", "fail"


class ToolCallParser:
    """Splits one choice's output into content and tool calls as it arrives.

    Before the format's trigger, text is content (minus a tail that could be the start of the
    trigger, held back). From the trigger on, the calls are read with a small JSON scanner:
    - `incremental=False` (tool_choice auto): a call is given out when it is complete and parses,
      with a known function name; anything that does not parse is given back as content.
    - `incremental=True` (a grammar guarantees the form): the name as soon as it is read, the
      arguments piece by piece as they are written.
    With `parallel=False`, calls after the first are dropped."""

    def __init__(self, fmt: ToolFormat, names: Iterable[str], *, incremental: bool = False, parallel: bool = True):
        self.fmt, self.names = fmt, set(names)
        self.incremental, self.parallel = incremental, parallel
        self.buf = ""  # text not yet settled (held content, or the tool-call region)
        self.in_region = False
        self.content_only = False  # a failed parse: everything after is content
        self.calls: list[dict] = []  # finished calls: {"id", "name", "arguments"}
        self._pos = 0  # region: how far buf is settled
        self._stage = "open"  # open | between | call | after_call | done
        self._opened = 0  # region_open literals matched
        self._call: Optional[_CallScan] = None

    # ---- feeding -----------------------------------------------------------------------------
    def feed(self, text: str) -> list[Piece]:
        if self.content_only:
            return [Content(text)] if text else []
        self.buf += text
        out: list[Piece] = []
        if not self.in_region:
            out += self._scan_content()
        if self.in_region:
            out += self._scan_region(final=False)
        return out

    def finish(self) -> list[Piece]:
        """The answer ended: held text is content; so is an unfinished or unparsable call."""
        if self.content_only:
            rest, self.buf = self.buf, ""
            return [Content(rest)] if rest else []
        if self.in_region:
            return self._scan_region(final=True)
        rest, self.buf = self.buf, ""  # NOTE: a held-back start of the trigger, or llama3_json's leading space
        return [Content(rest)] if rest else []

    # ---- before the trigger ----------------------------------------------------------------------
    def _scan_content(self) -> list[Piece]:
        trigger = self.fmt.trigger
        if self.fmt is LLAMA3_JSON:
            return self._scan_llama3_start()
        at = self.buf.find(trigger)
        if at >= 0:
            before, self.buf = self.buf[:at], self.buf[at:]
            self.in_region = True
            return [Content(before)] if before else []
        keep = _partial_suffix(self.buf, trigger)
        text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return [Content(text)] if text else []

    def _scan_llama3_start(self) -> list[Piece]:
        s = self.buf.lstrip()
        if not s:
            return []  # NOTE: whitespace alone: the answer may still begin with a call
        if s.startswith("{") or s.startswith(PYTHON_TAG):
            # NOTE: the leading whitespace stays before a "{": the region skips it before a call, and
            # gives it back with the rest if what follows is not a call after all
            self.buf = s[len(PYTHON_TAG) :] if s.startswith(PYTHON_TAG) else self.buf
            self.in_region = True
            return []
        if PYTHON_TAG.startswith(s):
            return []
        self.content_only = True
        rest, self.buf = self.buf, ""
        return [Content(rest)]

    # ---- the tool-call region ----------------------------------------------------------------------
    def _scan_region(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        fmt = self.fmt
        while True:
            if self._stage == "open":
                if self._opened == len(fmt.region_open):
                    self._stage = "between"
                    continue
                r = self._expect(fmt.region_open[self._opened])
                if r is True:
                    self._opened += 1
                    continue
            elif self._stage == "between":
                r = self._between()
            elif self._stage == "call":
                r = self._scan_call(out)
                if r is True:
                    self._stage = "after_call"
            elif self._stage == "after_call":
                r = self._expect(fmt.call_close) if fmt.call_close else True
                if r is True:
                    self._stage = "between"
                    # NOTE: settled text leaves the buffer (a long answer is not rescanned, and a
                    # later call that fails gives back only its own text)
                    self.buf, self._pos = self.buf[self._pos :], 0
            else:  # done: what follows the calls
                r = _WAIT
            if r is True:
                continue
            if r == _FAIL:
                return out + self._give_up()
            if final:
                out += self._at_end()
            return out

    def _at_end(self) -> list[Piece]:
        """The answer ended while the region waited for more text."""
        rest = self.buf[self._pos :]
        if self._stage == "done":
            self.buf, self._pos = "", 0
            return [Content(rest)] if rest.strip() else []
        if self._stage in ("between", "after_call") and self.calls:
            # NOTE: the calls are complete; a missing closing marker (EOS came first) is forgiven
            self.buf, self._pos = "", 0
            r = rest.strip()
            closers = (self.fmt.call_close, self.fmt.region_close, self.fmt.separator)
            if not r or any(c and c.startswith(r) for c in closers):
                return []
            return [Content(rest)]
        if self.incremental:
            # NOTE: a forced call (a grammar holds the form) cut short: before its name was read, what
            # is left is the format's markup, not an answer; after, its arguments went out as written
            self.buf, self._pos, self._call = "", 0, None
            return []
        return self._give_up()

    def _between(self):
        """After the region's opening or a call: the region's end, a separator, or the next call."""
        fmt = self.fmt
        start = self._pos
        self._skip_ws()
        rest = self.buf[self._pos :]
        if not rest:
            return _WAIT
        if self.calls:
            if fmt.region_close:
                r = _match(rest, fmt.region_close)
                if r is True:
                    self._pos += len(fmt.region_close)
                    self._stage = "done"
                    return True
                if r == _WAIT:
                    return _WAIT
            if fmt.separator:
                r = _match(rest, fmt.separator)
                if r == _WAIT:
                    return _WAIT
                if r is _FAIL:
                    if fmt.region_close:
                        return _FAIL
                    self._stage, self._pos = "done", start  # llama3_json: text after the last call
                    return True
                self._pos += len(fmt.separator)
        if fmt.call_open:
            r = self._expect(fmt.call_open)
            if r == _FAIL and self.calls:
                self._stage, self._pos = "done", start  # hermes: text after the last block
                return True
            if r is not True:
                return r
        self._stage, self._call = "call", None
        return True

    def _scan_call(self, out: list[Piece]):
        self._skip_ws()
        if self._call is None:
            if self._pos >= len(self.buf):
                return _WAIT
            if self.buf[self._pos] != "{":
                return _FAIL
            self._call = _CallScan(self._pos)
        call = self._call
        index = len(self.calls)
        keep = self.parallel or index == 0
        if self.incremental and keep and not call.started:
            head = _HEAD.match(self.buf, call.start)
            name = _unescape(head.group(1)) if head is not None else None
            if name is not None:
                # NOTE: the scanner starts over knowing where the arguments begin (the head is short)
                call = self._call = _CallScan(call.start)
                call.started, call.args_start, call.args_sent = True, head.end(), head.end()
                call.id = new_call_id(self.fmt)
                out.append(CallStart(index, call.id, name))
        end = call.scan(self.buf)
        if self.incremental and keep:
            if call.started:
                upto = call.args_end if call.args_end is not None else call.pos
                if upto > call.args_sent:
                    out.append(Arguments(index, self.buf[call.args_sent : upto]))
                    call.args_sent = upto
        if end is None:
            return _FAIL if call.broken else _WAIT
        text = self.buf[call.start : end]
        parsed = _parse_call(text, self.names)
        self._pos = end
        if parsed is None and not call.started:
            return _FAIL
        if keep:
            name, args = parsed if parsed is not None else (None, None)
            if not call.started:
                call.id = new_call_id(self.fmt)
                out.append(CallStart(index, call.id, name))
                out.append(Arguments(index, args))
            self.calls.append({"id": call.id, "name": name, "arguments": args})
        self._call = None
        return True

    def _expect(self, literal: str):
        self._skip_ws()
        r = _match(self.buf[self._pos :], literal)
        if r is True:
            self._pos += len(literal)
        return r

    def _skip_ws(self) -> None:
        while self._pos < len(self.buf) and self.buf[self._pos] in " \t\r\n":
            self._pos += 1

    def _give_up(self) -> list[Piece]:
        """The region does not parse: from the first unfinished call on, it is content."""
        if self._call is not None and self._call.started:
            self.content_only = True  # NOTE: only incremental calls start early; keep what was sent
            self.buf, self._pos, self._call = "", 0, None
            return []
        rest = self.buf
        self.buf, self._pos, self._call = "", 0, None
        self.content_only = True
        return [Content(rest)] if rest else []


class _CallScan:
    """Finds where a JSON object ends, character by character, across feeds; notes where the value
    at depth 2 (the arguments) ends."""

    def __init__(self, start: int):
        self.start, self.pos = start, start
        self.depth, self.in_string, self.escape = 0, False, False
        self.broken = False
        self.started, self.id = False, ""
        self.args_start = self.args_sent = 0
        self.args_end: Optional[int] = None

    def scan(self, buf: str) -> Optional[int]:
        """-> the index after the object's closing brace, or None while it is open."""
        i, n = self.pos, len(buf)
        while i < n:
            c = buf[i]
            i += 1
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1 and self.started and self.args_end is None and i - 1 >= self.args_start:
                    self.args_end = i
                if self.depth == 0:
                    self.pos = i
                    return i
                if self.depth < 0:
                    self.broken = True
                    self.pos = i
                    return None
        self.pos = i
        return None


def _parse_call(text: str, names: set[str]) -> Optional[tuple[str, str]]:
    """A call object -> (name, arguments as JSON text), or None when it is not a call to a known tool."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # NOTE: some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    head = _HEAD.match(text)
    raw = None
    if head is not None:
        # NOTE: the arguments exactly as written, when they are the object's second member
        scan = _CallScan(0)
        scan.started, scan.args_start = True, head.end()
        scan.scan(text)
        if scan.args_end is not None:
            raw = text[head.end() : scan.args_end]
    return obj["name"], raw if raw is not None else json.dumps(args, ensure_ascii=False)


def _unescape(s: str) -> Optional[str]:
    try:
        return json.loads(f'"{s}"')
    except ValueError:
        return None


def _match(rest: str, literal: str):
    """True when `rest` starts with `literal`, _WAIT when it is a start of it, else _FAIL."""
    if rest.startswith(literal):
        return True
    return _WAIT if literal.startswith(rest) else _FAIL


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a start of `marker` (to hold back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
