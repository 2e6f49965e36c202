"""The X-LoRA pipeline step by step against PEFT's full recomputation: chunked prefill, decode steps
and batches of sequences at different lengths, with the dual KV cache and with --no-xlora-kv-cache;
--tgt-non-granular-index; the per-slot hooks and the per-sequence scalings report; a GGUF base; the engine end to end."""

from __future__ import annotations

import threading

import pytest
import torch

from mistralrs_py.pipeline.base import load_pipeline
from tests.lora.xlora_util import build_xlora, full_scalings, make_pool, ref, rel_err, step

MODES = pytest.mark.parametrize("no_kv_cache", [False, True], ids=["dual-cache", "no-cache"])


@pytest.fixture(scope="module")
def llama_case(tiny_llama, tmp_path_factory):
    return build_xlora(tiny_llama, tmp_path_factory.mktemp("xl"), seed=1)


@pytest.fixture(scope="module")
def mistral_case(tiny_mistral, tmp_path_factory):
    # NOTE: sliding window 8 < the sequences below, so both passes' windows are exercised
    return build_xlora(tiny_mistral, tmp_path_factory.mktemp("xm"), seed=2, layerwise=False, depth=1)


def seqs_for(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@MODES
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_chunked_prefill_then_decode_equals_peft(request, arch, no_kv_cache):
    case = request.getfixturevalue(f"{arch}_case")
    pipe = load_pipeline(case.spec(no_xlora_kv_cache=no_kv_cache))
    assert pipe.cache_streams == (1 if no_kv_cache else 2)
    (ids,) = seqs_for(pipe.config.vocab_size, [21], 7)
    want, want_s = ref(case, ids)
    pool = make_pool(pipe)
    pipe.begin_slot(2)
    got = step(pipe, pool, prefill=[(2, 0, ids[:9])])
    assert rel_err(got[0], want[8]) < 1e-4
    got = step(pipe, pool, prefill=[(2, 9, ids[9:16])])  # the second chunk reads cached keys
    assert rel_err(got[0], want[15]) < 1e-4
    assert (full_scalings(pipe) - want_s[9:16]).abs().max() < 1e-5
    for pos in range(16, 21):
        got = step(pipe, pool, decode=[(2, pos, ids[pos])])
        assert rel_err(got[0], want[pos]) < 1e-4, pos
        assert (full_scalings(pipe)[0] - want_s[pos]).abs().max() < 1e-5, pos


@MODES
def test_batched_decode_of_sequences_at_different_lengths(llama_case, no_kv_cache):
    """Decode rows of three lengths in non-contiguous slots plus a prefill chunk, in one step."""
    pipe = load_pipeline(llama_case.spec(no_xlora_kv_cache=no_kv_cache))
    seqs = seqs_for(pipe.config.vocab_size, [6, 14, 10, 8], 11)
    wants = [ref(llama_case, s)[0] for s in seqs]
    pool = make_pool(pipe, slots=6)
    slots = [5, 0, 3, 1]
    for s in slots:
        pipe.begin_slot(s)
    for s, toks in zip(slots[:3], seqs[:3]):
        step(pipe, pool, prefill=[(s, 0, toks[:-3])])
    step(pipe, pool, prefill=[(slots[3], 0, seqs[3][:4])])
    for k in (3, 2, 1):  # three decode steps for the first three; the fourth finishes its prompt meanwhile
        decode = [(s, len(t) - k, t[-k]) for s, t in zip(slots[:3], seqs[:3])]
        prefill = [(slots[3], 4, seqs[3][4:])] if k == 3 else []
        got = step(pipe, pool, decode=decode, prefill=prefill)
        for r, t in enumerate(seqs[:3]):
            assert rel_err(got[r], wants[r][len(t) - k]) < 1e-4, (k, r)
        if prefill:
            assert rel_err(got[3], wants[3][-1]) < 1e-4


@MODES
@pytest.mark.parametrize("tgt", [0, 2])
def test_tgt_non_granular_index_freezes_scalings(llama_case, monkeypatch, no_kv_cache, tgt):
    """Reference: PEFT with the classifier's scalings after position P = prompt_len - 1 + tgt replaced by
    those at P. Sequence A is frozen while B (a later prompt) is not, then both are (no scaling pass)."""
    pipe = load_pipeline(llama_case.spec(no_xlora_kv_cache=no_kv_cache, tgt_non_granular_index=tgt))
    a, b = seqs_for(pipe.config.vocab_size, [12, 12], 5)
    pa, pb = 5, 7  # prompt lengths

    clf = llama_case.classifier
    orig = clf.forward

    def frozen_ref(ids, p):
        def fwd(*args, **kw):
            s = orig(*args, **kw).clone()
            s[:, p + 1 :] = s[:, p : p + 1]
            return s

        monkeypatch.setattr(clf, "forward", fwd)
        try:
            return ref(llama_case, ids)[0]
        finally:
            monkeypatch.setattr(clf, "forward", orig)

    want_a, want_b = frozen_ref(a, pa - 1 + tgt), frozen_ref(b, pb - 1 + tgt)
    unfrozen_a = ref(llama_case, a)[0]
    calls = []
    real = pipe.xlora.scaling_hidden
    monkeypatch.setattr(pipe.xlora, "scaling_hidden", lambda *x: calls.append(1) or real(*x))
    pool = make_pool(pipe)
    pipe.begin_slot(0)
    step(pipe, pool, prefill=[(0, 0, a[:pa])])
    for pos in range(pa, pb):  # A decodes alone
        calls.clear()
        got = step(pipe, pool, decode=[(0, pos, a[pos])])
        assert rel_err(got[0], want_a[pos]) < 1e-4, pos
        assert bool(calls) == (pos - pa + 1 <= tgt), pos  # the scaling pass stops after the freeze
    assert rel_err(want_a[-1], unfrozen_a[-1]) > 1e-3  # freezing changes the model
    pipe.begin_slot(1)
    got = step(pipe, pool, decode=[(0, pb, a[pb])], prefill=[(1, 0, b[:pb])])  # mixed: B's prompt runs the pass
    assert rel_err(got[0], want_a[pb]) < 1e-4 and rel_err(got[1], want_b[pb - 1]) < 1e-4
    for pos in range(pb + 1, 12):
        calls.clear()
        got = step(pipe, pool, decode=[(0, pos, a[pos]), (1, pos - 1, b[pos - 1])])
        assert rel_err(got[0], want_a[pos]) < 1e-4 and rel_err(got[1], want_b[pos - 1]) < 1e-4, pos
        assert bool(calls) == (pos - 1 - pb + 1 <= tgt), pos
    # a new sequence in slot 0 starts unfrozen: begin_slot resets the slot (A never ended here)
    pipe.begin_slot(0)
    calls.clear()
    step(pipe, pool, prefill=[(0, 0, b[:pb])])
    got = step(pipe, pool, decode=[(0, pb, b[pb])])
    assert rel_err(got[0], want_b[pb]) < 1e-4


def test_end_slot_reports_mean_scalings_per_adapter(llama_case):
    pipe = load_pipeline(llama_case.spec())
    a, b = seqs_for(pipe.config.vocab_size, [9, 6], 3)
    pool = make_pool(pipe)
    pipe.begin_slot(0)
    pipe.begin_slot(2)
    step(pipe, pool, prefill=[(0, 0, a[:6]), (2, 0, b)])
    for pos in range(6, 9):
        step(pipe, pool, decode=[(0, pos, a[pos])])
    rep = pipe.end_slot(0)["xlora_scalings"]
    assert list(rep) == llama_case.names
    want = ref(llama_case, a)[1].mean(dim=(0, 1))  # mean over positions and layers
    assert torch.allclose(torch.tensor(list(rep.values())), want, atol=1e-5)
    assert abs(sum(rep.values()) - 1) < 1e-5
    assert pipe.end_slot(0) is None  # reset: nothing ran in slot 0 since
    assert torch.allclose(
        torch.tensor(list(pipe.end_slot(2)["xlora_scalings"].values())),
        ref(llama_case, b)[1].mean(dim=(0, 1)),
        atol=1e-5,
    )


def test_begin_slot_starts_a_fresh_report(llama_case):
    """A sequence given a slot whose previous owner never ended (no end_slot) reports its own
    scalings only: begin_slot resets the slot, not the sight of a prompt at position 0."""
    pipe = load_pipeline(llama_case.spec())
    a, b = seqs_for(pipe.config.vocab_size, [9, 6], 4)
    pool = make_pool(pipe)
    pipe.begin_slot(1)
    step(pipe, pool, prefill=[(1, 0, a)])
    pipe.begin_slot(1)
    step(pipe, pool, prefill=[(1, 0, b[:4])])
    step(pipe, pool, prefill=[(1, 4, b[4:])])
    rep = pipe.end_slot(1)["xlora_scalings"]
    assert torch.allclose(torch.tensor(list(rep.values())), ref(llama_case, b)[1].mean(dim=(0, 1)), atol=1e-5)


def test_gguf_base_quantized(tmp_path):
    """Adapters and classifier unquantized on a GGUF base kept quantized (Q4_0/Q4_1/Q8_0), against PEFT
    on transformers' dequantized load of the same file."""
    from tests.conftest import make_tiny_model
    from tests.gguf_util import write_gguf

    hf = make_tiny_model(tmp_path / "hf", "llama", seed=4)
    (tmp_path / "g").mkdir()
    path = write_gguf(hf, tmp_path / "g" / "tiny.gguf")
    case = build_xlora(path.parent, tmp_path / "x", gguf_file=path.name, seed=4)
    pipe = load_pipeline(case.spec())
    assert "quantized" in pipe.summary["format"] and "X-LoRA 3 adapters" in pipe.summary["format"]
    (ids,) = seqs_for(pipe.config.vocab_size, [15], 1)
    want, want_s = ref(case, ids)
    pool = make_pool(pipe)
    pipe.begin_slot(0)
    got = step(pipe, pool, prefill=[(0, 0, ids[:12])], all_rows=True)
    assert rel_err(got, want[:12]) < 1e-4
    for pos in range(12, 15):
        got = step(pipe, pool, decode=[(0, pos, ids[pos])])
        assert rel_err(got[0], want[pos]) < 1e-4


@MODES
def test_engine_batched_greedy_equals_peft_generate(llama_case, no_kv_cache):
    from mistralrs_py.engine.engine import Engine
    from mistralrs_py.engine.request import Delta, Done, Request, SamplingParams

    pipe = load_pipeline(llama_case.spec(no_xlora_kv_cache=no_kv_cache))
    prompts = seqs_for(pipe.config.vocab_size, [5, 11, 8], 9)
    engine = Engine(pipe, max_seqs=3, prefill_chunk=6)  # the 11-token prompt takes two chunks
    out: dict[int, list[int]] = {}
    extra: dict[int, dict] = {}
    done = threading.Event()

    def emit_for(i):
        def emit(ev):
            if isinstance(ev, Delta):
                out.setdefault(i, []).extend(ev.token_ids)
            elif isinstance(ev, Done):
                extra[i] = ev.extra
                if len(extra) == len(prompts):
                    done.set()

        return emit

    engine.start()
    try:
        for i, p in enumerate(prompts):
            engine.add_request(
                Request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), emit_for(i))
            )
        assert done.wait(60)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = llama_case.peft.generate(
                input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
        assert out[i] == want, i
        assert list(extra[i]["xlora_scalings"]) == llama_case.names
