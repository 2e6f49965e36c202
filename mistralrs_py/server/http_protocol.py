"""uvicorn's HTTP/1.1 connections (httptools or h11) with limits on what one client may hold: the
bytes and the number of a request's headers, the time to send its head and its body, idle
keep-alive time, and how many connections are open at once.

NOTE: these are checked while the request arrives, before routing and before --api-key: httptools
itself limits neither the size nor the number of headers, and a connection that never finishes its
head (or never sends anything) is otherwise never closed."""

from __future__ import annotations

import http
import json
import logging
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..openai.protocol import error_body

log = logging.getLogger("mistralrs.server")
LINGER = 2.0  # NOTE: seconds a refused connection is read (and discarded) after its answer, see _refuse


@dataclass(frozen=True)
class HTTPLimits:
    max_header_bytes: int = 64 * 1024  # the request line and headers together (431 beyond)
    max_headers: int = 100  # header fields in one request (431 beyond)
    header_timeout: float = 10.0  # a request's head, from its first byte (or the connection's start)
    body_timeout: float = 30.0  # longest wait for the next bytes of a request body
    keep_alive_timeout: float = 5.0  # an idle connection between requests
    max_connections: int = 1000  # open at once; more are answered 503 and closed


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


_last_note: dict[int, list] = {}


def _note(status: int, line: str) -> None:
    """One log line per refusal, but at most one a second per status: a flood of hostile connections
    must not become a flood of log lines (the lines left out are counted in the next one)."""
    now = time.monotonic()
    last = _last_note.setdefault(status, [0.0, 0])
    if now - last[0] < 1.0:
        last[1] += 1
        return
    more = f" (and {last[1]} more like it)" if last[1] else ""
    last[0], last[1] = now, 0
    log.info("%s%s", line, more)


class _Limited:
    """What both parsers share: timers, the connection cap and refusals. Mixed in before uvicorn's class."""

    limits: HTTPLimits = HTTPLimits()
    _head_timer = _body_timer = None
    _over_cap = _refused = False
    _last_rx = 0.0

    # ---- the connection ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        if len(self.server_state.connections) >= self.limits.max_connections:
            # NOTE: refused before anything is read, so established connections (streams) are untouched
            self._over_cap, self.transport = True, transport
            _note(503, f"refused a connection: {self.limits.max_connections} are open (--max-connections)")
            msg = f"the server has {self.limits.max_connections} open connections, its limit; retry later"
            self._refuse(_Refusal(503, "server_overloaded", msg), log_it=False)
            return
        super().connection_made(transport)
        self._last_rx = self.loop.time()
        self._arm_head()  # NOTE: a connection that never sends a byte is closed after --header-timeout too

    def connection_lost(self, exc) -> None:
        self._disarm_head()
        self._disarm_body()
        if not self._over_cap:
            super().connection_lost(exc)

    def _client(self) -> str:
        return "%s:%d" % self.client if self.client else "-"

    def _refuse(self, why: _Refusal, log_it: bool = True) -> None:
        """Answers `why` and closes the connection. NOTE: the answer goes out, then the connection stays
        readable (and what arrives is thrown away) for a moment before it closes: closing a socket with
        unread data makes the kernel send a reset, and the client would never see the answer."""
        if log_it:
            _note(why.status, f"{self._client()} - {why.status} {http.HTTPStatus(why.status).phrase}: {why.message}")
        self._refused = True
        self._disarm_head()
        self._disarm_body()
        kind = "server_error" if why.status >= 500 else "invalid_request_error"
        body = json.dumps(error_body(why.message, kind, None, why.code)).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (why.status, http.HTTPStatus(why.status).phrase.encode())]
        extra = [(b"retry-after", b"1")] if why.status == 503 else []
        for name, value in [*getattr(self.server_state, "default_headers", []), *extra]:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        transport = self.transport
        if transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_complete:
            # NOTE: the request being read is over: its route sees a disconnect now, and cannot write
            # after this answer
            cycle.disconnected = True
            cycle.message_event.set()
        transport.write(b"".join(head) + body)
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    # ---- timers ---------------------------------------------------------------------------------
    def _arm_head(self) -> None:
        if self._head_timer is None and not self._refused:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_expired)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun():
            self.transport.close()  # NOTE: nothing sent: nobody to answer
        elif self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # NOTE: a pipelined head begun during a response: close after it
        else:
            t = self.limits.header_timeout
            self._refuse(_Refusal(408, "request_timeout", f"the request's headers did not arrive within {t:g} s"))

    def _arm_body(self) -> None:
        if self._body_timer is None and not self._refused:
            self._last_rx = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_expired)

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_expired(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        now, limit = self.loop.time(), self.limits.body_timeout
        if self.flow.read_paused:  # NOTE: we stopped reading (the app is busy): not the client's fault
            self._last_rx = now
        if now - self._last_rx < limit:
            self._body_timer = self.loop.call_later(limit - (now - self._last_rx), self._body_expired)
            return
        why = _Refusal(408, "request_timeout", f"no request body bytes arrived for {limit:g} s")
        if self.cycle is not None and self.cycle.response_started:
            _note(408, f"{self._client()} - closed: {why.message}")
            self.transport.close()
        else:
            self._refuse(why)


class _H11Connection(h11.Connection):
    """h11's connection, refusing a request with too many headers (h11 parses a head at once, so the
    count is checked on its Request event) and remembering why it refused (uvicorn's answer is a 400)."""

    def __init__(self, limits: HTTPLimits):
        # NOTE: h11's own limit on an unfinished event's buffer is the head's limit (h11's default: 16 KiB)
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.limits, self.rejection = limits, None

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                self.rejection = _too_big(self.limits)
            raise
        if isinstance(event, h11.Request):
            # NOTE: a whole head that arrived in one read is parsed without h11's limit: measured here
            size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if len(event.headers) > self.limits.max_headers:
                self.rejection = _too_many(self.limits)
            elif size > self.limits.max_header_bytes:
                self.rejection = _too_big(self.limits)
            if self.rejection is not None:
                raise h11.RemoteProtocolError(self.rejection.message, error_status_hint=431)
        return event


class LimitedH11Protocol(_Limited, H11Protocol):
    """h11 (the pure-Python parser): it keeps the bytes of an unfinished head in its buffer, and checks
    their size itself."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _H11Connection(self.limits)

    def _head_begun(self) -> bool:
        return self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])

    def data_received(self, data: bytes) -> None:
        if self._over_cap or self._refused:
            return
        self._last_rx = self.loop.time()
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def _sync(self) -> None:
        """After h11 has parsed what it could: which of the head and body timers runs now."""
        if self._refused or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self.conn.trailing_data[0]:  # NOTE: bounded: h11 refuses a longer unfinished head
                self._arm_head()
        else:
            self._disarm_head()
            if state is h11.SEND_BODY:
                self._arm_body()
            else:
                self._disarm_body()

    def send_400_response(self, msg: str) -> None:
        if self.conn.rejection is not None:
            self._refuse(self.conn.rejection)
        else:
            super().send_400_response(msg)


def _too_big(limits: HTTPLimits) -> _Refusal:
    msg = f"the request's line and headers are larger than {limits.max_header_bytes} bytes"
    return _Refusal(431, "request_header_too_large", msg)


def _too_many(limits: HTTPLimits) -> _Refusal:
    return _Refusal(431, "request_header_too_large", f"the request has more than {limits.max_headers} headers")


def _httptools_class():
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(_Limited, HttpToolsProtocol):
        """httptools (llhttp): it buffers an unfinished header's name and value itself and reports a
        header only once it is whole, so the bytes of an unfinished head are counted as they arrive."""

        _in_head = False
        _head_cb = _head_rx = _nheaders = 0

        def _head_begun(self) -> bool:
            return self._in_head

        def data_received(self, data: bytes) -> None:
            if self._over_cap or self._refused:
                return
            self._last_rx = self.loop.time()
            self._unset_keepalive_if_required()
            began = self._in_head
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError as e:
                if isinstance(e.__context__, _Refusal):
                    return self._refuse(e.__context__)
                self.logger.warning("Invalid HTTP request received.")
                return self.send_400_response("Invalid HTTP request received.")
            if self._in_head:
                # NOTE: the head still unfinished: a chunk that began with it counts whole; the chunk it
                # began in counts what the parser reported (an unfinished header in it is not, at most
                # one read's worth: the memory held stays within the limit plus one read)
                self._head_rx = self._head_rx + len(data) if began else self._head_cb
                if max(self._head_rx, self._head_cb) > self.limits.max_header_bytes:
                    self._refuse(_too_big(self.limits))

        def _count(self, n: int) -> None:
            self._head_cb += n
            if self._head_cb > self.limits.max_header_bytes:
                raise _too_big(self.limits)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_cb, self._head_rx, self._nheaders = True, 0, 0, 0
            self._arm_head()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._nheaders += 1
            if self._nheaders > self.limits.max_headers:
                raise _too_many(self.limits)
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_head()
            super().on_headers_complete()
            self._arm_body()

        def on_message_complete(self) -> None:
            self._disarm_body()
            super().on_message_complete()

    return LimitedHttpToolsProtocol


def protocol_class(limits: HTTPLimits, parser: str = "auto") -> type:
    """The class to give uvicorn.Config(http=...): httptools when installed (as uvicorn's "auto"), else h11."""
    if parser == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            parser = "h11"
        else:
            parser = "httptools"
    base = _httptools_class() if parser == "httptools" else LimitedH11Protocol
    return type(base.__name__, (base,), {"limits": limits})
