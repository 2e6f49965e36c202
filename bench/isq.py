"""`make bench`'s in-situ quantization rows: the embedded model exported as a bf16 safetensors
checkpoint, served by `mistral` as it is and with `--isq q8_0` / `--isq q4_0`: decode speed (run
alternately), resident memory after loading and one short prompt (a fresh process each), and perplexity and KL divergence
against the bf16 load on bench/quality_text.txt (the quality row's measure).

Run alone: `python bench/isq.py [--threads 2]`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import CACHE, Run, alternate, export_hf  # noqa: E402
from bench.quality import CTX, TEXT  # noqa: E402
from mistralrs_py.engine.engine import Engine  # noqa: E402
from mistralrs_py.engine.perplexity import measure  # noqa: E402
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline  # noqa: E402

TYPES = (None, "q8_0", "q4_0", "q4_k")

_RSS = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
from mistralrs_py.engine.kv_cache import KVCachePool
before = rss()
pipe = load_pipeline(ModelSpec(ModelKind.PLAIN, model_id=sys.argv[1], dtype="bfloat16", device="cpu", isq=sys.argv[2] or None))
# NOTE: one short prompt, so that weights read from the memory-mapped file count as they do when serving
pool = KVCachePool.for_pipeline(pipe, 1)
pipe.forward(torch.arange(8), pool.build_view([], [(0, 0, 8)], None, [True]), pool)
print(rss() - before)
"""


def spec(hf: Path, isq: str | None) -> ModelSpec:
    return ModelSpec(ModelKind.PLAIN, model_id=str(hf), dtype="bfloat16", device="cpu", isq=isq)


def isq(threads: int, repeats: int) -> dict:
    hf = export_hf(CACHE / "smollm2-bf16")
    pipes = {str(t): load_pipeline(spec(hf, t)) for t in TYPES}
    base = pipes["None"]
    R: dict = {"kernels": {k: p.summary["format"] for k, p in pipes.items()}}
    runs = {k: Run(Engine(p, max_seqs=4)) for k, p in pipes.items()}
    R["decode_tok_s"] = alternate(runs, base.tokenizer, repeats, 128, 1)
    R["rss_mb"] = {}
    for t in TYPES:
        out = subprocess.run(
            [sys.executable, "-c", _RSS, str(hf), t or "", str(threads)], capture_output=True, text=True, cwd=ROOT
        )
        R["rss_mb"][str(t)] = float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    ids = base.tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    R["quality"] = {}
    for t in TYPES[1:]:
        q = measure(pipes[str(t)], ids, CTX, reference=base)
        R["quality"][str(t)] = {"ppl": q.ppl, "ppl_bf16": q.ref_ppl, "kld": q.kld, "top1": q.top1}
    return R


def report_rows(R: dict) -> list[tuple]:
    d = R["decode_tok_s"]
    return [
        (f"mistral --isq {t} decode, 1 stream (tok/s)", d[t], d["None"], "same checkpoint in bf16", target)
        for t, target in (("q4_0", ">= 1.5x"), ("q8_0", "reported"))
    ]


def report_lines(R: dict) -> list[str]:
    rss, out = R["rss_mb"], []
    for t in TYPES[1:]:
        q = R["quality"][str(t)]
        out.append(
            f"--isq {t}: PPL {q['ppl']:.4f} (bf16 {q['ppl_bf16']:.4f}), mean KLD vs bf16 {q['kld']:.6f}, same top "
            f"token {100 * q['top1']:.2f}%; RSS after load and a prompt +{rss[str(t)] or float('nan'):.0f} MB (bf16 "
            f"+{rss['None'] or float('nan'):.0f} MB); kernels: {R['kernels'][str(t)]}"
        )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    R = isq(a.threads, a.repeats)
    print(json.dumps(R, indent=2))
    print("\n".join(report_lines(R)))
