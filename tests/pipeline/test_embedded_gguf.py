"""The embedded SmolLM2 GGUF served by `gguf-mistral --dtype float32` against transformers on the same file."""

from __future__ import annotations

import threading

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Delta, Done, Request, SamplingParams
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline
from mistralrs_py.pipeline.hub import embedded_gguf_path

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):", "Water boils at"]


@pytest.mark.slow
def test_first_12_greedy_tokens_equal_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    pipe = load_pipeline(ModelSpec(ModelKind.GGUF, dtype="float32", device="cpu"))
    engine = Engine(pipe, max_seqs=4)
    engine.start()
    try:
        results, done = {}, threading.Event()

        def emit_for(i):
            def emit(ev):
                if isinstance(ev, Delta):
                    results.setdefault(i, []).extend(ev.token_ids)
                elif isinstance(ev, Done):
                    finished.add(i)
                    if len(finished) == len(PROMPTS):
                        done.set()

            return emit

        finished: set = set()
        prompts = [ref_tok(p)["input_ids"] for p in PROMPTS]
        for i, ids in enumerate(prompts):
            assert pipe.tokenizer.encode(PROMPTS[i]) == ids
            engine.add_request(
                Request(f"p{i}", ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), emit_for(i))
            )
        assert done.wait(120)
    finally:
        engine.stop()
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        assert results[i] == want, PROMPTS[i]
