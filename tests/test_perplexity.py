"""Perplexity and KL divergence (llama-perplexity's measure) against transformers in float32."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.engine.perplexity import chunk_logprobs, chunks, measure
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline
from tests.conftest import CORPUS

TEXT = " ".join(CORPUS * 3)


@pytest.fixture(scope="module")
def pipes(tiny_llama, tmp_path_factory):
    from tests.gguf_util import write_gguf

    gguf = write_gguf(tiny_llama, tmp_path_factory.mktemp("g") / "tiny.gguf")
    hf = load_pipeline(ModelSpec(ModelKind.PLAIN, model_id=str(tiny_llama), dtype="float32", device="cpu"))
    q = load_pipeline(
        ModelSpec(
            ModelKind.GGUF, quantized_filename=str(gguf), tokenizer_id=str(tiny_llama), dtype="bfloat16", device="cpu"
        )
    )
    return hf, q


def test_perplexity_equals_transformers_on_the_same_chunks(pipes, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf, _ = pipes
    ids = hf.tokenizer.encode(TEXT, add_special_tokens=False)
    ctx = 64
    report = measure(hf, ids, ctx)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    nll = []
    for chunk in chunks(ids, ctx, None):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].float(), -1)
        nll += [-float(lp[j, chunk[j + 1]]) for j in range(ctx // 2, ctx - 1)]
    assert report.tokens == len(nll) == (len(ids) // ctx) * (ctx - 1 - ctx // 2)
    assert report.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_kl_divergence_is_zero_against_itself_and_matches_torch_against_a_quantized_run(pipes):
    hf, q = pipes
    ids = hf.tokenizer.encode(TEXT, add_special_tokens=False)
    same = measure(hf, ids, 64, reference=hf)
    assert same.kld == pytest.approx(0.0, abs=1e-9) and same.top1 == 1.0 and same.ref_ppl == pytest.approx(same.ppl)
    report = measure(q, ids, 64, reference=hf)
    # independently: torch's kl_div over the same rows
    kl, n, agree = 0.0, 0, 0
    for chunk in chunks(ids, 64, None):
        a = chunk_logprobs(q, chunk, KVCachePool.for_pipeline(q, 1))[32:-1]
        b = chunk_logprobs(hf, chunk, KVCachePool.for_pipeline(hf, 1))[32:-1]
        kl += float(torch.nn.functional.kl_div(a, b, log_target=True, reduction="sum"))
        n += a.shape[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    assert report.kld > 0 and report.kld == pytest.approx(kl / n, rel=1e-3)
    assert report.top1 == agree / n


def test_the_perplexity_command(tiny_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cmd = [sys.executable, "-m", "mistralrs_py", "--threads", "1", "--dtype", "float32", "--perplexity", str(text)]
    cmd += ["--kl-divergence", "--ppl-context", "64", "mistral", "-m", str(tiny_llama)]  # fmt: skip
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", **__import__("os").environ}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "PPL = " in run.stdout and "mean KLD = 0.000000" in run.stdout and "same top token = 100.000%" in run.stdout
    short = tmp_path / "short.txt"
    short.write_text("too short")
    run = subprocess.run(cmd[:8] + [str(short)] + cmd[9:], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "at least one chunk" in run.stderr
