"""A tiny model written to GGUF by the tests, served quantized, against transformers loading that GGUF."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.models import qmatmul
from mistralrs_py.pipeline.base import LoadError, ModelKind, ModelSpec, load_pipeline
from mistralrs_py.pipeline.gguf import load_gguf_file
from tests.conftest import make_tiny_model
from tests.gguf_util import write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    hf = make_tiny_model(d / "hf", "llama", seed=3)
    return hf, write_gguf(hf, d / "tiny.gguf")


def logits_for(pipe, ids):
    pool = KVCachePool.for_pipeline(pipe, 1)
    view = pool.build_view([], [(0, 0, len(ids))], pipe.config.sliding_window, [True])
    h = pipe.model.hidden_states(torch.tensor(ids), view, pool)
    return pipe.model.lm_head(h).float()


def ref_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


def greedy(pipe, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits_for(pipe, ids)[-1].argmax()))
    return ids


def test_quantized_logits_match_transformers_gguf(tiny_gguf):
    hf, path = tiny_gguf
    ref = ref_model(path)
    ids = list(range(10, 40))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    # --dtype float32: every layer dequantized exactly
    exact = load_gguf_file(path, ModelSpec(dtype="float32"), torch.device("cpu"), torch.float32, quantized=True)
    assert "dense float32" in exact.summary["format"] and "qmm" not in exact.summary["format"]
    got = logits_for(exact, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    # float32 by default (--dtype auto on a CPU without bf16): the blocks stay packed and our
    # kernels take float32 activations, rounded to int8 per 32-block as llama.cpp does
    if qmatmul.available():
        auto = load_gguf_file(path, ModelSpec(), torch.device("cpu"), torch.float32, quantized=True)
        assert "qmm4" in auto.summary["format"] and auto.summary["weights_bytes"] < exact.summary["weights_bytes"] / 3
        got_auto = logits_for(auto, ids)
        assert got_auto.dtype == torch.float32
        # NOTE: the activations' int8 rounding alone (the op itself is checked against an emulation
        # of it in test_qmatmul); as the bf16 path below
        assert 0 < ((got_auto - want).abs().max() / want.abs().max()).item() < 0.05
    # bf16 compute with the quantized kernels (ours, int8 activations; else torch's int4/int8):
    # within bf16 rounding and the activations' int8 rounding of the dequantized model
    fast = load_gguf_file(path, ModelSpec(), torch.device("cpu"), torch.bfloat16, quantized=True)
    kernel = "qmm4" if qmatmul.available() else "int4pack"
    assert any(kernel in k for k in fast.summary["format"].split(", ")), fast.summary["format"]
    got16 = logits_for(fast, ids)
    assert ((got16 - want).abs().max() / want.abs().max()).item() < 0.05
    # against the float (unquantized) model, the error is the quantization error and no more
    from transformers import AutoModelForCausalLM

    flt = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        fl = flt(torch.tensor([ids])).logits[0]
    quant_err = (want - fl).abs().max().item()
    assert 0 < (got - fl).abs().max().item() <= quant_err * 1.01 + 1e-4
    assert (got16 - fl).abs().max().item() <= quant_err * 1.5 + 0.05


def test_greedy_tokens_equal_transformers(tiny_gguf):
    _, path = tiny_gguf
    ref = ref_model(path)
    pipe = load_gguf_file(path, ModelSpec(dtype="float32"), torch.device("cpu"), torch.float32, quantized=True)
    prompt = [5, 17, 33, 2, 90]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
    assert greedy(pipe, prompt, 12) == want
    # the tokenizer comes from the GGUF metadata and matches the HF one it was written from
    from mistralrs_py.pipeline.tokenizer import load_hf_tokenizer

    hf_tok = load_hf_tokenizer(tiny_gguf[0])
    text = "The quick brown fox, café 日本 🙂"
    assert pipe.tokenizer.encode(text) == hf_tok.encode(text)


def test_bad_gguf_files_are_one_line_errors(tmp_path, tiny_gguf):
    _, path = tiny_gguf
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for p in (junk, truncated):
        with pytest.raises(LoadError) as e:
            load_gguf_file(p, ModelSpec(), torch.device("cpu"), torch.float32, quantized=True)
        assert "\n" not in str(e.value)


def test_gguf_mistral_resolves_directory_and_file(tiny_gguf):
    _, path = tiny_gguf
    for spec in (
        ModelSpec(ModelKind.GGUF, quantized_model_id=str(path.parent), quantized_filename=path.name),
        ModelSpec(ModelKind.GGUF, quantized_filename=str(path)),
        ModelSpec(ModelKind.GGUF, quantized_model_id=str(path.parent)),
    ):
        spec.device, spec.dtype = "cpu", "float32"
        assert load_pipeline(spec).config.num_layers == 2
    with pytest.raises(LoadError, match="quantized-filename"):
        load_pipeline(ModelSpec(ModelKind.GGUF, quantized_model_id="org/repo-GGUF", device="cpu"))


def _malformed_cases():
    from tests.gguf_util import kv_str, kv_str_array, kv_u32, raw_gguf

    base = [kv_str("general.architecture", b"llama")]
    return {
        "absurd_dims": raw_gguf(base, [("token_embd.weight", [1 << 40, 1 << 40], 0, 0)], b"\0" * 64),
        "wrapping_dims": raw_gguf(base, [("token_embd.weight", [1 << 63, 2], 0, 0)], b"\0" * 64),
        "offset_past_end": raw_gguf(base, [("token_embd.weight", [4, 4], 0, 1 << 30)], b"\0" * 64),
        "huge_string": raw_gguf([kv_str("general.architecture", b"llama", declared_len=1 << 60)], []),
        "bad_alignment": raw_gguf(
            base + [kv_u32("general.alignment", 3)], [("token_embd.weight", [4, 4], 0, 0)], b"\0" * 64
        ),
        "huge_array": raw_gguf(
            base + [kv_str_array("tokenizer.ggml.tokens", [b"a", b"b"], declared_count=1 << 50)], []
        ),
        "not_gguf": b"PK\x03\x04" + b"\0" * 100,
        # F32 tensors of 4 x 4 (64 bytes): one 8 bytes off the 32-byte grid, then two sharing bytes
        "misaligned_offset": raw_gguf(base, [("token_embd.weight", [4, 4], 0, 8)], b"\0" * 128),
        "overlapping_tensors": raw_gguf(
            base, [("token_embd.weight", [4, 4], 0, 0), ("output.weight", [4, 4], 0, 32)], b"\0" * 128
        ),
    }


@pytest.mark.parametrize("case", list(_malformed_cases()))
def test_malformed_gguf_is_a_quick_one_line_error(tmp_path, case):
    import resource
    import time

    p = tmp_path / f"{case}.gguf"
    p.write_bytes(_malformed_cases()[case])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    t = time.monotonic()
    try:
        # NOTE: a memory cap makes an attempted huge allocation fail here instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))
        with pytest.raises(LoadError) as e:
            load_gguf_file(p, ModelSpec(), torch.device("cpu"), torch.float32, quantized=True)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert time.monotonic() - t < 10
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400 and "\x00" not in msg
    assert {"misaligned_offset": "not aligned", "overlapping_tensors": "overlap"}.get(case, "") in msg


def test_load_summary_counts_quantized_weights(tiny_gguf):
    _, path = tiny_gguf
    q = load_gguf_file(path, ModelSpec(), torch.device("cpu"), torch.bfloat16, quantized=True)
    d = load_gguf_file(path, ModelSpec(), torch.device("cpu"), torch.bfloat16, quantized=False)
    # quantized blocks are counted (not just the norms), and they are smaller than dense bf16
    assert 0.2 * d.summary["weights_bytes"] < q.summary["weights_bytes"] < d.summary["weights_bytes"]
