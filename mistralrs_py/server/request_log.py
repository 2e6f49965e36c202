"""--log FILE: one JSON line per request and its response."""

from __future__ import annotations

import json
import threading
import time
from typing import Optional


class RequestLog:
    """Appends one JSON line per request/response. NOTE: JSON-encoding means request text can never
    forge a log line (newlines inside strings are escaped)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if not self.path:
            return
        line = json.dumps({"time": time.time(), **record}, ensure_ascii=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
