"""`make bench`'s quality row: perplexity over bench/quality_text.txt (the Apache License 2.0, ~2,300
English tokens) for our default GGUF path and for `--dtype float32` (the exact path), and the mean
KL divergence and top-token agreement of the default path against that float32 reference, beside
llama.cpp's (llama-cpp-python with all logits, when `make bench-peers` installed it) on the same file,
text and chunks: llama-perplexity's measure (`--kl-divergence`)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.engine.perplexity import chunk_bos, chunk_logprobs, chunks, measure
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline

TEXT = Path(__file__).parent / "quality_text.txt"
CTX = 512

_LLAMA_CPP_LOGPROBS = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, threads, chunks_file, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
chunks = json.load(open(chunks_file))
llm = Llama(model_path=path, n_threads=threads, n_ctx=len(chunks[0]), logits_all=True, verbose=False)
rows = []
for chunk in chunks:
    llm.reset()
    llm.eval(chunk)
    logits = np.array(llm.scores[: len(chunk)], dtype=np.float32)
    first = len(chunk) // 2
    x = logits[first:-1]
    x = x - x.max(-1, keepdims=True)
    rows.append(x - np.log(np.exp(x).sum(-1, keepdims=True)))
np.save(out, np.concatenate(rows))
"""


def llama_cpp_logprobs(gguf: Path, threads: int, chunk_list: list[list[int]]) -> np.ndarray | None:
    """llama.cpp's log-softmax rows for the scored positions of the same chunks, from a process of its own."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        cf, out = Path(d) / "chunks.json", Path(d) / "lp.npy"
        cf.write_text(json.dumps(chunk_list))
        r = subprocess.run(
            [sys.executable, "-c", _LLAMA_CPP_LOGPROBS, str(gguf), str(threads), str(cf), str(out)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            print(f"  llama-cpp-python perplexity failed ({why}): its numbers are left out", flush=True)
            return None
        return np.load(out)


def quality(gguf: Path, threads: int) -> dict:
    default = load_pipeline(ModelSpec(ModelKind.GGUF, device="cpu"))
    exact = load_pipeline(ModelSpec(ModelKind.GGUF, device="cpu", dtype="float32"))
    ids = default.tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    ours = measure(default, ids, CTX, reference=exact)
    R = {
        "tokens": ours.tokens,
        "default_kernels": default.summary.get("format"),
        "ppl_default": ours.ppl,
        "ppl_float32": ours.ref_ppl,
        "kld_default": ours.kld,
        "top1_default": ours.top1,
    }
    if default.dtype != torch.bfloat16:
        # NOTE: where the default is float32 (CPUs without AVX-512), the bf16 path is measured too:
        # it is the default on the CPUs that have our int8-activation kernels
        bf16 = load_pipeline(ModelSpec(ModelKind.GGUF, device="cpu", dtype="bfloat16"))
        b = measure(bf16, ids, CTX, reference=exact)
        R.update(bf16_kernels=bf16.summary.get("format"), ppl_bf16=b.ppl, kld_bf16=b.kld, top1_bf16=b.top1)
        del bf16
    chunk_list = list(chunks(ids, CTX, chunk_bos(default.tokenizer)))
    theirs = llama_cpp_logprobs(gguf, threads, chunk_list)
    if theirs is not None:
        pool = KVCachePool.for_pipeline(exact, 1)
        ref = torch.cat([chunk_logprobs(exact, c, pool)[CTX // 2 : -1] for c in chunk_list])
        lp = torch.from_numpy(theirs)[:, : ref.shape[1]]
        targets = torch.tensor([t for c in chunk_list for t in c[CTX // 2 + 1 :]])
        R["ppl_llama_cpp"] = float(torch.exp(-lp.gather(1, targets[:, None]).mean()))
        R["kld_llama_cpp"] = float((ref.exp() * (ref - lp)).sum(-1).clamp(min=0).mean())
        R["top1_llama_cpp"] = float((ref.argmax(-1) == lp.argmax(-1)).float().mean())
    return R


def report_lines(Q: dict) -> list[str]:
    out = [
        f"quality over {Q['tokens']} tokens (chunks of {CTX}): PPL default {Q['ppl_default']:.4f}, "
        f"float32 {Q['ppl_float32']:.4f}; default vs float32: mean KLD {Q['kld_default']:.6f}, "
        f"same top token {100 * Q['top1_default']:.2f}%"
    ]
    if "kld_bf16" in Q:
        out.append(
            f"  --dtype bfloat16: PPL {Q['ppl_bf16']:.4f}, mean KLD {Q['kld_bf16']:.6f}, "
            f"same top token {100 * Q['top1_bf16']:.2f}%"
        )
    if "kld_llama_cpp" in Q:
        ok = "met" if Q["kld_default"] <= Q["kld_llama_cpp"] else "NOT met"
        if "kld_bf16" in Q:
            ok += f"; bf16 path: {'met' if Q['kld_bf16'] <= Q['kld_llama_cpp'] else 'NOT met'}"
        out.append(
            f"  llama.cpp on the same file: PPL {Q['ppl_llama_cpp']:.4f}, mean KLD {Q['kld_llama_cpp']:.6f}, "
            f"same top token {100 * Q['top1_llama_cpp']:.2f}% (target: our KLD <= llama.cpp's: {ok})"
        )
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    from mistralrs_py.pipeline.hub import embedded_gguf_path

    print("\n".join(report_lines(quality(embedded_gguf_path(), 2))))
