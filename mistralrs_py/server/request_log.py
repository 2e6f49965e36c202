"""--log FILE: one JSON line per request and its response."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Optional

log = logging.getLogger("mistralrs.server")

# NOTE: json.dumps escapes every control character below U+0020 (so \\n, \\r, \\v, \\f, \\x1c-\\x1e),
# but with ensure_ascii=False it leaves the other line separators Unicode knows (NEL, LS, PS) as
# they are, and lone surrogates (valid in JSON text, "\\ud800") unencodable as UTF-8: escape those.
_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


def to_line(record: dict) -> str:
    """One line of JSON whatever the text in it: no character a line splitter would break on."""
    text = json.dumps(record, ensure_ascii=False, default=str)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class RequestLog:
    """Appends one JSON line per request/response. NOTE: JSON-encoding means request text can never
    forge a log line; a record that cannot be written costs a warning, never the response."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if not self.path:
            return
        try:
            line = to_line({"time": time.time(), **record})
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except Exception as e:  # noqa: BLE001 - logging must never fail a response
            log.warning("could not write the request log (%s: %s)", type(e).__name__, e)
