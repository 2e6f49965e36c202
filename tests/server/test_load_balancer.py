"""The README's "Scaling out" example, run: two real servers behind nginx with deploy/nginx.conf (its
ports moved to free ones). The official openai client through nginx: each session (X-Session-ID)
stays on one server, sessions spread over both, streams pass through as they are generated, and
when one server stops its sessions move to the other."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, running_server

CONF = Path(__file__).parents[2] / "deploy" / "nginx.conf"


def _nginx(tmp_path: Path, port: int, backends: list[int]) -> subprocess.Popen:
    text = CONF.read_text()
    assert "127.0.0.1:8000" in text and "127.0.0.1:8001" in text and "127.0.0.1:8002" in text
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    for old, new in zip((8001, 8002), backends):
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    (tmp_path / "deploy").mkdir(parents=True)
    (tmp_path / "deploy" / "nginx.conf").write_text(text)
    # NOTE: the README's command line, from the prefix directory
    proc = subprocess.Popen(
        ["nginx", "-p", str(tmp_path), "-c", "deploy/nginx.conf"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
    raise RuntimeError("nginx did not start")


def _sessions_in(log: Path) -> set[str]:
    if not log.exists():
        return set()
    return {json.loads(line)["request"].get("user") for line in log.read_text().splitlines() if line.strip()}


def test_two_servers_behind_nginx_keep_each_session_on_one(tiny_llama, tmp_path):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (make test installs Debian's nginx-light where it can)")
    from openai import OpenAI

    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    common = ["--max-seqs", "4", "--dtype", "float32", "--max-model-len", "128"]
    with (
        running_server([*common, "--log", str(logs[0])], ["mistral", "-m", str(tiny_llama)]) as a,
        running_server([*common, "--log", str(logs[1])], ["mistral", "-m", str(tiny_llama)]) as b,
    ):
        port = free_port()
        nginx = _nginx(tmp_path / "lb", port, [a.port, b.port])
        try:
            url = f"http://127.0.0.1:{port}/v1"

            def ask(session: str, stream: bool = False):
                c = OpenAI(base_url=url, api_key="unused", max_retries=0, default_headers={"X-Session-ID": session})
                kw = dict(model="default", prompt=f"hello {session}", max_tokens=6, temperature=0, user=session)
                if stream:
                    return [ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices]
                return c.completions.create(**kw).choices[0].text

            sessions = [f"session-{i}" for i in range(16)]
            for _ in range(3):
                for s in sessions:
                    ask(s)
            on_a, on_b = _sessions_in(logs[0]), _sessions_in(logs[1])
            assert on_a | on_b == set(sessions)
            assert not on_a & on_b, "a session reached both servers"
            assert on_a and on_b, "every session went to one server"
            # streams pass through nginx chunk by chunk, with the whole answer's text
            pieces = ask(sessions[0], stream=True)
            assert len(pieces) > 1 and "".join(pieces) == ask(sessions[0])
            # one server stops (SIGTERM: it drains, then exits): its sessions move to the other
            a.proc.send_signal(signal.SIGTERM)
            assert a.proc.wait(60) == 0
            for s in sorted(on_a)[:4]:
                assert ask(s) is not None
            assert set(sorted(on_a)[:4]) <= _sessions_in(logs[1])
        finally:
            nginx.terminate()
            nginx.wait(10)
