"""One thread runs all torch work: loading, engine set-up and the engine loop (see engine/worker.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import SamplingParams
from mistralrs_py.engine.worker import TorchThread
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir

from .fake import run


def test_call_runs_there_and_raises_here():
    w = TorchThread(name="t")
    assert w.call(lambda: threading.current_thread()) is w.thread
    with pytest.raises(ValueError, match="boom"):
        w.call(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert w.call(lambda: w.call(lambda: 7)) == 7  # a call from the thread itself runs inline


def test_the_engine_loop_runs_on_the_thread_that_loaded_the_model(tiny_llama, monkeypatch):
    w = TorchThread(threads=1)
    pipe = w.call(
        load_safetensors_dir, tiny_llama, ModelSpec(model_id=str(tiny_llama)), torch.device("cpu"), torch.float32
    )
    engine = w.call(Engine, pipe, max_seqs=2, worker=w)
    seen = set()
    real = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: seen.add(threading.current_thread()) or real(self))
    engine.start()
    try:
        assert engine.alive
        col = run(engine, [[5, 9, 14]], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)])[0]
        assert len(col.tokens()) == 4
    finally:
        engine.stop()
    assert seen == {w.thread} and not engine.alive
    assert w.call(lambda: 1 + 1) == 2  # the thread outlives the loop and still takes calls


def test_the_client_start_up_loads_on_the_engine_thread(tiny_llama, monkeypatch):
    from mistralrs_py.engine.client import EngineClient, EngineOptions
    from mistralrs_py.pipeline import base

    threads = {}
    real = base.load_pipeline

    def load(spec, progress=None):
        threads["load"] = threading.current_thread()
        return real(spec, progress)

    monkeypatch.setattr(base, "load_pipeline", load)
    spec = ModelSpec(model_id=str(tiny_llama), dtype="float32", device="cpu")
    client = EngineClient.start(spec, EngineOptions(max_seqs=2, prefill_chunk=64, threads=1))
    try:
        assert client.engine.worker is not None and threads["load"] is client.engine.worker.thread
        assert threads["load"] is not threading.main_thread()
        assert client.alive
    finally:
        client.stop()
