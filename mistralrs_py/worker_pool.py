"""Work that may crash, hang or balloon, done in child processes so that it fails its own request
instead of the server: chat templates from model files, grammars from clients.

    pool = WorkerPool("mistralrs_py.pipeline.template_worker", [str(limit)], workers=2)
    reply = pool.call({"template": ..., "context": ...}, timeout=5.0)    # a dict, as the child answered
    # WorkerTimeout: the child overran and was killed; WorkerDied: it ended (a crash, out of memory)

    # in the child (`python -m that.module ...`):
    serve(lambda job: {...})             # answers frames from stdin until it closes

Frames are length-prefixed JSON. A pool starts its children on first use and replaces one that died;
`init` is sent to every new child as its first frame (what it needs before its first job).

NOTE: imported by the children too: stdlib only, nothing of the package.
"""

from __future__ import annotations

import json
import os
import queue
import select
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional


class WorkerDied(RuntimeError):
    """The child ended while working (a crash, the memory limit) or sent something unreadable."""


class WorkerTimeout(RuntimeError):
    """The child did not answer in time; it was killed."""


def write_frame(stream, obj) -> None:
    data = json.dumps(obj).encode("utf-8")
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def read_frame(stream) -> object:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack(">I", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return json.loads(data)


def cap_memory(limit: str) -> None:
    """The child's whole address space capped at `limit` bytes (its argv), so that what it runs fails
    with a MemoryError, or ends it, instead of taking the server's memory."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    except (ImportError, ValueError, OSError):  # NOTE: no such limit on this OS: the time limit stays
        pass


def serve(handle: Callable[[object], object]) -> None:
    """The child's loop: one reply per job frame, until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            job = read_frame(stdin)
        except EOFError:
            return
        write_frame(stdout, handle(job))


class _Worker:
    def __init__(self, module: str, argv: list[str], init: Optional[dict]):
        env = dict(os.environ)
        # NOTE: the child imports this very package, wherever it was imported from here
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if init is not None:
            write_frame(self.proc.stdin, init)

    def call(self, job, timeout: float):
        try:
            write_frame(self.proc.stdin, job)
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                self.kill()
                raise WorkerTimeout(f"no answer within {timeout:g} s")
            return read_frame(self.proc.stdout)
        except (EOFError, OSError, ValueError) as e:  # NOTE: a broken pipe, a reply that is not a frame
            self.kill()
            raise WorkerDied(type(e).__name__) from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()


class WorkerPool:
    """A few child processes running `python -m module *argv`; `call()` takes an idle one (or waits
    for one), starting or replacing it as needed. Thread-safe."""

    def __init__(self, module: str, argv: list[str], workers: int = 1, init: Optional[dict] = None):
        self.module, self.argv, self.init = module, list(argv), init
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # NOTE: started on first use

    def call(self, job, timeout: float):
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive():
                worker = _Worker(self.module, self.argv, self.init)
            return worker.call(job, timeout)
        finally:
            self._idle.put(worker if worker is not None and worker.alive() else None)

    def close(self) -> None:
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            if worker is not None:
                worker.kill()
