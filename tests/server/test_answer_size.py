"""Large answers, through a real server: an answer's logprob entries are bounded (a 400 naming the
parameter past mistralrs_py.openai.limits.MAX_LOGPROB_ENTRIES), and one under the bound that takes
seconds to assemble and encode never holds up the event loop (/health keeps answering)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from mistralrs_py.openai.limits import MAX_LOGPROB_ENTRIES
from tests.server.conftest import running_server

PROMPTS = [[(7 * i + k) % 180 + 5 for i in range(250)] for k in range(2)]
# echo + logprobs 20: 21 entries a prompt token; the most choices a prompt may have (n is at most 128)
N_ALLOWED = MAX_LOGPROB_ENTRIES // (2 * 250 * 21)


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(
        ["--max-seqs", "8", "--max-model-len", "256", "--dtype", "float32"], ["mistral", "-m", str(tiny_llama)]
    ) as srv:
        yield srv.url


def echo_body(n: int) -> dict:
    return {"model": "default", "prompt": PROMPTS, "echo": True, "logprobs": 20, "max_tokens": 0, "n": n}


def test_health_answers_while_a_large_answer_is_built(server):
    latencies: list[float] = []
    done = threading.Event()

    def poll():
        with httpx.Client(timeout=30) as h:
            while not done.is_set():
                t = time.monotonic()
                assert h.get(f"{server}/health").status_code == 200
                latencies.append(time.monotonic() - t)
                time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        t = time.monotonic()
        r = httpx.post(f"{server}/v1/completions", json=echo_body(N_ALLOWED), timeout=300)
        took = time.monotonic() - t
    finally:
        done.set()
        poller.join(30)
    assert r.status_code == 200, r.text[:300]
    choices = r.json()["choices"]
    assert len(choices) == 2 * N_ALLOWED
    assert all(len(c["logprobs"]["token_logprobs"]) == 250 for c in choices)
    assert all(0 < len(top) <= 21 for c in choices for top in c["logprobs"]["top_logprobs"][1:])
    # the answer took seconds (so an event loop busy building it would have shown), /health never did
    assert took > 1.5, f"the answer took {took:.1f} s: too little to tell"
    assert len(latencies) > 10 and max(latencies) < 1.0, f"/health took up to {max(latencies):.2f} s"


def test_an_answer_past_the_bound_is_refused_naming_the_parameter(server):
    r = httpx.post(f"{server}/v1/completions", json=echo_body(N_ALLOWED + 1), timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["param"] == "logprobs" and f"{MAX_LOGPROB_ENTRIES:,}" in err["message"]
    # vLLM's prompt_logprobs
    body = {**echo_body(N_ALLOWED + 1), "echo": False, "logprobs": None, "prompt_logprobs": 20}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert "prompt_logprobs" in r.json()["error"]["message"]


def test_the_bound_counts_every_choice_and_the_context_left():
    """The count itself (mistralrs_py.openai.limits), chat's naming included: a chat request on the
    tiny server (256 tokens of context, n at most 128) cannot pass the bound."""
    from mistralrs_py.engine.request import SamplingParams
    from mistralrs_py.openai import limits
    from mistralrs_py.openai import protocol as P

    ids = list(range(100))
    chat = P.parse(P.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    params = SamplingParams(n=8, logprobs=True, top_logprobs=20, prompt_logprobs=5)
    # 8 x (100 x 6 + (4096 - 100) x 21): max_tokens left out counts the context's room
    assert limits.logprob_entries([ids], params, 4096) == (8 * 100 * 6, 8 * 3996 * 21)
    with pytest.raises(P.InvalidRequest) as e:
        limits.check_chat(chat.model_copy(update={"top_logprobs": 20}), ids, params, 8192)
    assert e.value.param == "top_logprobs" and e.value.status == 400
    small = SamplingParams(n=8, logprobs=True, top_logprobs=20, max_tokens=100, prompt_logprobs=5)
    limits.check_chat(chat, ids, small, 8192)  # 8 x (600 + 2100): allowed
    with pytest.raises(P.InvalidRequest) as e:
        limits.check_chat(chat, ids * 20, SamplingParams(n=128, max_tokens=1, prompt_logprobs=20), 8192)
    assert e.value.param == "prompt_logprobs"


def test_the_answer_is_encoded_in_pieces_as_json_dumps_would():
    import json

    from mistralrs_py.server.answers import encode

    deep = {"x": [[{"t": "é\u2028", "v": -1.5, "k": [None, True, 3]} for _ in range(700)]]}
    answer = {"a": [1, 2.5, "s"], "choices": [deep, {"b": {1: "one", None: [], "c": list(range(1000))}}], "n": None}
    pieces = list(encode(answer))
    assert "".join(pieces) == json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert max(len(p) for p in pieces) < len("".join(pieces)) / 2  # no one piece is the whole answer
    with pytest.raises(ValueError):
        "".join(encode({"a": [[[[[float("nan")] * 300]]]]}))  # as JSONResponse refuses it
