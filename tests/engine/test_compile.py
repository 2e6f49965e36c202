"""--compile: decode steps through torch.compile (padded to batch buckets) give the eager model's tokens."""

from __future__ import annotations

import shutil

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import SamplingParams
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir

from .test_engine import run

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on the CPU needs a C++ compiler (apt install g++)",
)


def test_compiled_decode_gives_the_eager_tokens(tiny_mistral):
    # tiny_mistral has a sliding window of 8: the batch of one takes the masked path as well
    pipe = load_safetensors_dir(tiny_mistral, ModelSpec(model_id=str(tiny_mistral)), torch.device("cpu"), torch.float32)
    prompts = [[5, 9, 14], list(range(20, 43)), [7] * 11]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    eager = Engine(pipe, max_seqs=4)
    eager.start()
    try:
        alone = [run(eager, [p], [params])[0].tokens() for p in prompts[:1]]
        batched = [c.tokens() for c in run(eager, prompts, [params] * 3)]
    finally:
        eager.stop()
    compiled = Engine(pipe, max_seqs=4, compile=True)
    assert pipe.compiled_decode is not None, "compiling failed (see the warning in the log)"
    calls = []
    real = pipe.compiled_decode
    pipe.compiled_decode = lambda ids, *rest: calls.append(len(ids)) or real(ids, *rest)
    compiled.start()
    # NOTE: start-up compiled one graph per batch bucket; serving other slots, cache lengths and
    # batch sizes must not compile again (a recompile raises here, failing the step and the test)
    torch._dynamo.config.error_on_recompile = True
    try:
        assert [run(compiled, [p], [params])[0].tokens() for p in prompts[:1]] == alone
        assert [c.tokens() for c in run(compiled, prompts, [params] * 3)] == batched
        assert [c.tokens() for c in run(compiled, prompts[1:], [params] * 2)] == batched[1:]
    finally:
        torch._dynamo.config.error_on_recompile = False
        compiled.stop()
        pipe.compiled_decode = None
    # decode steps ran compiled, padded to the batch buckets (3 sequences -> 4 rows)
    assert set(calls) == {1, 2, 4}
