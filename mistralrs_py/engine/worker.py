"""The one thread that runs torch: model loading, engine set-up and the engine loop.

NOTE: torch's CPU kernels run on OpenMP (GNU libgomp), which keeps a team of worker threads per
thread that starts parallel work. Once two threads have started parallel work (say the model loaded
on the main thread, the engine loop on its own thread), libgomp manages more threads than there
are cores and throttles its spin-waiting: every parallel region then ends in a futex sleep and a
wake-up, and a decode step of a small model (hundreds of parallel regions) runs ~1.7x slower on a
two-core machine (measured: 30 vs 54 tok/s for the embedded model). So everything that touches
tensors is handed to this one thread, and the main thread only serves HTTP.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class TorchThread:
    def __init__(self, name: str = "mistralrs-engine", threads: int | None = None):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()
        if threads:
            import torch

            # NOTE: the OpenMP thread count is per thread: set it where the work runs.
            self.call(torch.set_num_threads, threads)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs fn on this thread and returns its result here (or raises its exception here)."""
        if threading.current_thread() is self.thread:
            return fn(*args, **kwargs)
        fut: Future = Future()
        self._jobs.put((fn, args, kwargs, fut))
        return fut.result()

    def start(self, fn: Callable[[], Any]) -> None:
        """Runs fn (a long-lived loop, such as the engine's) on this thread; returns at once."""
        self._jobs.put((fn, (), {}, None))

    def _loop(self) -> None:
        while True:
            fn, args, kwargs, fut = self._jobs.get()
            if fut is None:
                fn()  # NOTE: the engine loop reports its own failures
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, whatever it is
                fut.set_exception(e)
