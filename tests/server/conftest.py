"""Real server processes for the HTTP tests: `python -m mistralrs_py ...` on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(global_args: list[str], model_args: list[str], timeout: float = 180):
    port = free_port()
    cmd = [sys.executable, "-m", "mistralrs_py", "--port", str(port), "--threads", "1", *global_args, *model_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # NOTE: output goes to a file, not a pipe: a pipe nobody reads fills up (access logs) and
    # blocks the server mid-test.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_llama, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    with running_server(["--max-seqs", "4", "--log", str(log), "--max-model-len", "128", "--dtype", "float32"],
                        ["mistral", "-m", str(tiny_llama)]) as url:
        yield url, log


@pytest.fixture(scope="session")
def embedded_server():
    with running_server(["--max-seqs", "4"], ["mistral"]) as url:
        yield url


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def embedded_gguf_server():
    with running_server(["--max-seqs", "4"], ["gguf-mistral"]) as url:
        yield url
