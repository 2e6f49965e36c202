"""`make bench`'s rows against vLLM's CPU engine (installed by `make bench-peers` in a venv of its
own, bench/peers_vllm.sh): the same exported bf16 checkpoint served by `mistral --dtype bfloat16`
and by `vllm serve`, the same load (streaming completions of 128 tokens, EOS ignored, distinct
prompts) at 1, 4, 16 and 64 streams, both with 64 sequences allowed at once.

Run alone: `python -m bench.vllm_peer [--threads 2]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import CACHE, export_hf, start_server, stream_load, wait_healthy  # noqa: E402

STREAMS = (1, 4, 16, 64)
VENV = CACHE / "vllm-venv"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def _load(base: str) -> dict:
    asyncio.run(stream_load(base, 2, 8))  # NOTE: warm (vLLM compiles its graphs on first use)
    return {str(c): asyncio.run(stream_load(base, c, 128)) for c in STREAMS}


def ours(hf: Path, threads: int) -> dict:
    port = 19300 + os.getpid() % 300
    proc = start_server(["--max-seqs", "64", "--dtype", "bfloat16", "mistral", "-m", str(hf)], port, threads)
    try:
        return _load(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait()


def vllm(hf: Path, threads: int) -> dict | None:
    """vLLM's numbers, or None when `make bench-peers` did not install it or it fails to serve."""
    exe = VENV / "bin" / "vllm"
    if not exe.exists():
        return None
    port = 19700 + os.getpid() % 200
    preload = [str(p) for p in (TCMALLOC, VENV / "lib" / "libiomp5.so") if p.exists()]
    env = {
        **os.environ,
        "LD_PRELOAD": ":".join(preload),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        str(exe),
        "serve",
        str(hf),
        "--served-model-name",
        "default",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "bfloat16",
        "--max-num-seqs",
        "64",
        "--hf-overrides",
        json.dumps({"architectures": ["LlamaForCausalLM"]}),
    ]
    # NOTE: its own process group: vLLM starts an engine-core process that must end with it
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        wait_healthy(proc, base, 900)  # NOTE: the first start compiles its model (~2.5 min here)
        out = _load(base)
        out["start_s"] = time.perf_counter() - t0
        return out
    except Exception as e:  # noqa: BLE001 - a peer that fails costs its numbers, not the run's
        print(f"  vllm failed ({type(e).__name__}: {e}; exit code {proc.poll()})", flush=True)
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compare(threads: int) -> dict:
    hf = export_hf(CACHE / "smollm2-bf16")
    return {"ours": ours(hf, threads), "vllm": vllm(hf, threads)}


def report_rows(R: dict) -> list[tuple]:
    theirs = R.get("vllm") or {}
    rows = []
    for c in STREAMS:
        mine = R["ours"][str(c)]
        peer = theirs.get(str(c), {})
        target = ">= 1.5x, TTFT p50 no worse" if c == 16 else "reported"
        rows.append(
            (
                f"mistral --dtype bfloat16 server, {c} streams x128 (tok/s)",
                mine["tok_s"],
                peer.get("tok_s"),
                "vLLM CPU",
                target,
            )
        )
    return rows


def report_lines(R: dict) -> list[str]:
    theirs = R.get("vllm") or {}
    out = []
    for c in STREAMS:
        mine, peer = R["ours"][str(c)], theirs.get(str(c))
        vs = f"; vLLM {peer['ttft_p50']:.3f} s" if peer else "; vLLM not installed (make bench-peers)"
        out.append(f"  bf16 server {c} streams TTFT p50: ours {mine['ttft_p50']:.3f} s{vs}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    R = compare(a.threads)
    print(json.dumps(R, indent=1))
    for name, mine, peer, pname, target in report_rows(R):
        ratio = f"{mine / peer:.2f}x" if peer else "n/a"
        print(f"{name}: {mine:.1f} vs {pname} {peer or float('nan'):.1f} = {ratio} ({target})")
    print("\n".join(report_lines(R)))
