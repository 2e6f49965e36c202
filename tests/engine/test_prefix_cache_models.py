"""The prefix cache on tiny real models (HF safetensors, GGUF, X-LoRA with and without its scaling
cache and with frozen scalings): greedy output is identical from a cold start, a full hit, a partial
hit and a multi-turn follow-up that reuses generated blocks, alone or batched, in float32."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Delta, Done, SamplingParams
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline

from .fake import run

GREEDY = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
BS = 4


@pytest.fixture(scope="module", params=["hf", "gguf", "xlora", "xlora-no-kv-cache", "xlora-frozen"])
def pipe(request, tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "hf":
        spec = ModelSpec(ModelKind.PLAIN, model_id=str(tiny_llama), dtype="float32", device="cpu")
    elif request.param == "gguf":
        from tests.gguf_util import write_gguf

        gguf = write_gguf(tiny_llama, d / "tiny.gguf")
        spec = ModelSpec(ModelKind.GGUF, quantized_filename=str(gguf), tokenizer_id=str(tiny_llama), device="cpu")
    else:
        from tests.lora.xlora_util import build_xlora

        spec = build_xlora(tiny_llama, d / "x", seed=5).spec(
            no_xlora_kv_cache=request.param == "xlora-no-kv-cache",
            tgt_non_granular_index=1 if request.param == "xlora-frozen" else None,
        )
    return load_pipeline(spec)


def started(pipe, **kw) -> Engine:
    e = Engine(pipe, **kw)
    e.start()
    return e


def cached_tokens(col) -> list[int]:
    return [ev.cached_tokens for ev in col.events if isinstance(ev, Done)]


def prompt_logprobs(col) -> list[float]:
    (lps,) = [ev.prompt_logprobs for ev in col.events if isinstance(ev, Delta) and ev.prompt_logprobs]
    return [x.logprob for x in lps[1:]]


def test_greedy_output_is_the_same_from_the_cache(pipe):
    system = [(7 * i) % 300 + 3 for i in range(21)]
    p0 = [*system, 11, 12, 13]  # 24 tokens
    p1 = [*system[:13], 40, 41, 42, 43, 44]  # shares 3 full blocks with p0
    cold = started(pipe, max_seqs=1, block_size=BS, prefix_caching=False)
    try:
        ref0 = run(cold, [p0], [GREEDY])[0].tokens()
        p2 = [*p0, *ref0, 60, 61, 62]  # the next turn: the history, the answer and a new message
        p3 = [250 - i for i in range(17)]  # shares nothing
        refs = [run(cold, [p], [GREEDY])[0].tokens() for p in (p0, p1, p2, p3)]
    finally:
        cold.stop()
    assert refs[0] == ref0
    e = started(pipe, max_seqs=4, block_size=BS, prefill_chunk=8)
    try:
        first = run(e, [p0], [GREEDY])[0]
        assert first.tokens() == refs[0] and cached_tokens(first) == [0]
        again = run(e, [p0], [GREEDY])[0]  # a full hit: the last block holds the last token, recomputed
        assert again.tokens() == refs[0] and cached_tokens(again) == [20]
        partial = run(e, [p1], [GREEDY])[0]
        assert partial.tokens() == refs[1] and cached_tokens(partial) == [12]
        turn = run(e, [p2], [GREEDY])[0]
        assert turn.tokens() == refs[2]
        # the answer's blocks were computed by decode steps; they serve the next turn unless the
        # pipeline's decode keys differ from a prompt's (X-LoRA's frozen scalings)
        reused = cached_tokens(turn)[0]
        assert reused == (24 if not pipe.caches_decoded_blocks else (len(p0) + len(ref0)) // BS * BS)
        # batched, all at once, with the cache warm (and the unrelated prompt cold)
        got = run(e, [p0, p1, p2, p3], [GREEDY] * 4)
        assert [c.tokens() for c in got] == refs
        snap = e.snapshot()
        assert snap["prefix_cache_hits"] > 0 and snap["kv_blocks_in_use"] == 0 and snap["errors"] == 0
    finally:
        e.stop()


def test_n_choices_and_prompt_logprobs_with_the_cache(pipe):
    prompt = [(5 * i) % 200 + 7 for i in range(19)]
    cold = started(pipe, max_seqs=1, block_size=BS, prefix_caching=False)
    try:
        ref = run(cold, [prompt], [GREEDY])[0].tokens()
        lp_ref = run(cold, [prompt], [SamplingParams(max_tokens=1, prompt_logprobs=0)])[0]
    finally:
        cold.stop()
    e = started(pipe, max_seqs=4, block_size=BS)
    try:
        run(e, [prompt], [GREEDY])
        c = run(e, [prompt], [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, n=3)])[0]
        assert c.tokens(0) == c.tokens(1) == c.tokens(2) == ref
        # prompt logprobs need every prompt row: such a request ignores the cache
        lp = run(e, [prompt], [SamplingParams(max_tokens=1, prompt_logprobs=0)])[0]
        assert cached_tokens(lp) == [0]
        got, want = prompt_logprobs(lp), prompt_logprobs(lp_ref)
        assert len(got) == len(prompt) - 1 and torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)
    finally:
        e.stop()
