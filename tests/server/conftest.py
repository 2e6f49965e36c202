"""Servers for the HTTP tests: real `python -m mistralrs_py ...` processes on a free port, or (for
fault injection) the app in this process. Every test that needs a server starts it through here."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen
    _log: object

    def output(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()


def wait_healthy(url: str, timeout: float, alive=lambda: True, why=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise RuntimeError(f"server exited:\n{why()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not become healthy in {timeout} s:\n{why()}")
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(global_args: list[str], model_args: list[str], timeout: float = 180, env: dict | None = None):
    """Yields a ServerProcess once /health answers 200; terminates it (then kills it) at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "mistralrs_py", "--port", str(port), "--threads", "1", *global_args, *model_args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    # NOTE: output goes to a file, not a pipe: a pipe nobody reads fills up (access logs) and
    # blocks the server mid-test.
    with tempfile.NamedTemporaryFile(mode="w+", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, text=True)
        srv = ServerProcess(f"http://127.0.0.1:{port}", port, proc, log)
        try:
            wait_healthy(srv.url, timeout, alive=lambda: proc.poll() is None, why=srv.output)
            yield srv
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def in_process_server(app):
    """The app under uvicorn on a thread of this process (tests that inject faults into the engine)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 30, alive=t.is_alive)
        yield url
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture(scope="session")
def tiny_server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    with running_server(
        ["--max-seqs", "4", "--log", str(log), "--max-model-len", "128", "--dtype", "float32"],
        ["mistral", "-m", str(tiny_llama)],
    ) as srv:
        yield srv.url, log


@pytest.fixture(scope="session")
def embedded_server():
    with running_server(["--max-seqs", "4"], ["mistral"]) as srv:
        yield srv.url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def embedded_gguf_server():
    with running_server(["--max-seqs", "4"], ["gguf-mistral"]) as srv:
        yield srv.url
