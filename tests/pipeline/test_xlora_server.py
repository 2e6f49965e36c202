"""A real `x-lora-mistral` server process on a tiny X-LoRA checkpoint: the `xlora_scalings` extension."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.lora.xlora_util import build_xlora
from tests.server.conftest import client, running_server


@pytest.fixture(scope="module")
def xlora_server(tiny_llama, tmp_path_factory):
    case = build_xlora(tiny_llama, tmp_path_factory.mktemp("xs") / "x", seed=5)
    with running_server(
        ["--max-seqs", "4", "--max-model-len", "128", "--dtype", "float32"],
        ["x-lora-mistral", "-m", str(tiny_llama), "-x", str(case.xlora_dir), "-o", str(case.ordering)],
    ) as srv:
        url = srv.url
        yield url, case


MSG = [{"role": "user", "content": "Tell me a story about a fox."}]


def check_scalings(sc, names):
    assert list(sc) == names
    assert all(0 <= v <= 1 for v in sc.values()) and abs(sum(sc.values()) - 1) < 1e-4  # means of softmax outputs


def test_chat_reports_scalings_when_asked(xlora_server):
    url, case = xlora_server
    r = client(url).chat.completions.create(
        model="default",
        messages=MSG,
        max_tokens=6,
        temperature=0,
        n=2,
        extra_body={"return_xlora_scalings": True, "ignore_eos": True},
    )
    assert len(r.choices) == 2 and r.usage.completion_tokens == 12
    for c in r.choices:
        check_scalings(c.model_extra["xlora_scalings"], case.names)
    # greedy: both choices ran the same tokens, so the same per-sequence means
    assert r.choices[0].model_extra["xlora_scalings"] == pytest.approx(
        r.choices[1].model_extra["xlora_scalings"], abs=1e-6
    )
    plain = client(url).chat.completions.create(model="default", messages=MSG, max_tokens=6, temperature=0)
    assert "xlora_scalings" not in (plain.choices[0].model_extra or {})
    assert plain.choices[0].message.content == r.choices[0].message.content[: len(plain.choices[0].message.content)]


def test_completion_and_stream_report_scalings(xlora_server):
    url, case = xlora_server
    body = {"model": "default", "prompt": "Paris is", "max_tokens": 5, "temperature": 0, "return_xlora_scalings": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    check_scalings(r["choices"][0]["xlora_scalings"], case.names)
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        timeout=60,
        json={"model": "default", "messages": MSG, "max_tokens": 5, "stream": True, "return_xlora_scalings": True},
    ) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    last = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(last) == 1
    check_scalings(last[0]["choices"][0]["xlora_scalings"], case.names)
    assert all("xlora_scalings" not in c["choices"][0] for c in chunks if c["choices"] and c is not last[0])
