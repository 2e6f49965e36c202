"""The engine client on the scripted pipeline: one stream per submission, sync and async, prompt-major
choice numbering, aborts on close, admission limits and the observer's view of every outcome."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mistralrs_py.engine.client import EngineClient, GenerationFailed
from mistralrs_py.engine.request import Delta, Done, SamplingParams

from .fake import PROMPTS, FakePipeline, expected, make_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


class Recorder:
    def __init__(self, log, prompt_tokens, n):
        self.log, self.events = log, []
        log.append(self)
        self.prompt_tokens, self.n, self.outcome = prompt_tokens, n, None

    def event(self, ev):
        self.events.append(ev)

    def end(self, outcome):
        assert self.outcome is None, "ended twice"
        self.outcome = outcome


@pytest.fixture
def client():
    clients = []

    def make(pipe=None, max_waiting=None, **kw):
        pipe = pipe or FakePipeline(max_model_len=4096)
        c = EngineClient(pipe, make_engine(pipe, **kw), max_waiting=max_waiting)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.stop()


def tokens_by_choice(events) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ev in events:
        if isinstance(ev, Delta):
            out.setdefault(ev.index, []).extend(ev.token_ids)
    return out


def test_sync_stream_numbers_choices_prompt_major(client):
    c = client(max_seqs=4)
    log = []
    c.observe = lambda p, n: Recorder(log, p, n)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    events = list(c.submit([PROMPTS[0], PROMPTS[2]], params, "multi"))
    got = tokens_by_choice(events)
    assert got == {
        0: expected(PROMPTS[0], 6),
        1: expected(PROMPTS[0], 6),
        2: expected(PROMPTS[2], 6),
        3: expected(PROMPTS[2], 6),
    }
    assert sorted(ev.index for ev in events if isinstance(ev, Done)) == [0, 1, 2, 3]
    (rec,) = log
    assert rec.outcome == "completed" and rec.n == 4 and rec.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[2])
    acct = c.snapshot()["requests"]
    assert acct["accepted"] == acct["completed"] == 1 and acct["outstanding"] == 0


def test_async_stream_gives_the_same_events(client):
    c = client(max_seqs=2)

    async def go():
        stream = c.submit([PROMPTS[1]], GREEDY, "a", loop=asyncio.get_running_loop())
        return [ev async for ev in stream]

    events = asyncio.run(go())
    assert tokens_by_choice(events) == {0: expected(PROMPTS[1], 6)}
    assert isinstance(events[-1], Done) and c.snapshot()["requests"]["completed"] == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_closing_a_stream_early_aborts_the_request(client, mode):
    c = client(FakePipeline(max_model_len=4096), max_seqs=2)
    log = []
    c.observe = lambda p, n: Recorder(log, p, n)
    long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    if mode == "sync":
        stream = c.submit([PROMPTS[0]], long, "gone")
        next(iter(stream))
        stream.close()
    else:

        async def go():
            stream = c.submit([PROMPTS[0]], long, "gone", loop=asyncio.get_running_loop())
            await stream.__anext__()
            await stream.aclose()

        asyncio.run(go())
    deadline = time.monotonic() + 10
    while c.snapshot()["kv_blocks_in_use"] and time.monotonic() < deadline:
        time.sleep(0.005)
    snap = c.snapshot()
    assert snap["kv_blocks_in_use"] == 0 and snap["aborted"] == 1 and snap["generated_tokens"] < 4000
    assert snap["requests"]["aborted"] == 1 and snap["requests"]["outstanding"] == 0
    assert log[0].outcome == "aborted"


def test_an_error_event_raises_and_is_counted(client):
    pipe = FakePipeline()
    c = client(pipe, max_seqs=2)
    log = []
    c.observe = lambda p, n: Recorder(log, p, n)
    pipe.fail_on = 39
    with pytest.raises(GenerationFailed, match="model forward failed"):
        list(c.submit([[39, 5]], GREEDY, "bad"))
    assert c.snapshot()["requests"]["errored"] == 1 and log[0].outcome == "errored"


def test_the_waiting_limit_refuses_at_once_but_an_idle_engine_takes_any_request(client):
    c = client(FakePipeline(max_model_len=4096), max_seqs=1, max_waiting=2)
    big = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=10)
    assert len(tokens_by_choice(list(c.submit([PROMPTS[0]], big, "big")))) == 10  # idle: 10 > 1 + 2 is fine
    long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    held = [c.submit([PROMPTS[0]], long, f"h{i}") for i in range(3)]  # 1 running + 2 waiting
    with pytest.raises(GenerationFailed) as e:
        c.submit([PROMPTS[0]], GREEDY, "one-too-many")
    assert e.value.code == "server_overloaded"
    assert c.snapshot()["requests"]["rejected"] == 1
    for s in held:
        s.close()


def test_a_stopped_engine_refuses_submissions(client):
    c = client(max_seqs=1)
    c.stop()
    with pytest.raises(GenerationFailed) as e:
        c.submit([PROMPTS[0]], GREEDY, "late")
    assert e.value.code == "engine_unavailable"
    assert c.snapshot()["requests"]["outstanding"] == 0


def test_streams_from_many_threads_are_batched_and_each_gets_its_own(client):
    pipe = FakePipeline()
    c = client(pipe, max_seqs=4)
    results = {}

    def work(i):
        results[i] = tokens_by_choice(list(c.submit([PROMPTS[i % 4]], GREEDY, f"t{i}")))[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: expected(PROMPTS[i % 4], 6) for i in range(8)}


def test_stopping_ends_open_streams_even_when_the_engine_is_stuck(client):
    pipe = FakePipeline()
    c = client(pipe, max_seqs=2)
    inside, release = threading.Event(), threading.Event()
    real = pipe.forward

    def stuck(*args):
        inside.set()
        release.wait(30)  # a step that does not end in time
        return real(*args)

    pipe.forward = stuck
    stream = c.submit([PROMPTS[0]], GREEDY, "stuck")
    assert inside.wait(10)
    t = time.monotonic()
    c.stop(timeout=0.2)
    with pytest.raises(GenerationFailed, match="shutting down"):
        next(stream)
    assert time.monotonic() - t < 5
    release.set()
