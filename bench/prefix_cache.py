"""`make bench`'s prefix-cache rows: two chat workloads whose prompts repeat a long prefix, run
through the HTTP server on gguf-mistral's default model with the prefix cache (the default) and
with `--no-prefix-cache`, beside llama-server with `cache_prompt` when `make bench-peers` built it.

1. multi-turn chat: concurrent conversations, each turn sending the whole history (~2,000 tokens at
   the last turn): the last turn's time to first token against the first's.
2. shared system prompt: concurrent requests under one ~1,500-token system prompt against as many
   under distinct system prompts of the same length: the TTFTs, and the peak KV bytes in use.

Run alone: `python bench/prefix_cache.py [--threads 2] [--quick]` prints the results dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import median, start_server, with_llama_server  # noqa: E402

# NOTE: ~1.13 tokens a word in the default model's tokenizer (counted once with it): 205 words are
# ~230 tokens, 1,330 words ~1,500 tokens
USER_WORDS = 205
SYSTEM_WORDS = 1330
WORDS = """harbor lantern river meadow copper garden window stone winter summer engine signal market
bridge forest candle ladder harvest thunder orchard kettle valley canyon glacier compass letter
village island mirror silver shadow pepper ribbon marble anchor feather basket helmet saddle timber
quiet bright ancient narrow gentle heavy hollow golden distant hidden careful patient sudden steady
walks carries builds follows gathers watches repairs counts paints measures opens crosses answers
under beyond across beside toward behind during without between against around through
the a every each one another some many several few this that their our""".split()


def text(seed: str, n_words: int) -> str:
    """Deterministic sentences of `n_words` words drawn by a generator seeded with `seed`: distinct
    seeds give texts that differ from their first words (no common prefix beyond the template)."""
    rng = random.Random(seed)
    sentences, n = [], 0
    while n < n_words:
        k = min(rng.randint(6, 14), n_words - n)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        sentences.append(s[0].upper() + s[1:] + ".")
        n += k
    return " ".join(sentences)


def sizes(quick: bool) -> dict:
    if quick:
        return {"conversations": 2, "turns": 3, "requests": 4}
    return {"conversations": 8, "turns": 6, "requests": 16}


# ---- one streamed chat completion -------------------------------------------------------------------------
async def chat(c, base: str, messages: list[dict], max_tokens: int, extra: dict) -> dict:
    """One streaming chat completion, greedy and EOS ignored: its TTFT (first non-empty content
    delta), its text, and the prompt and cached token counts of the final usage chunk."""
    body = {
        "model": "default",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        **extra,
    }
    t0 = time.perf_counter()
    first, parts, usage, timings = None, [], {}, {}
    async with c.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            usage = ch.get("usage") or usage
            timings = ch.get("timings") or timings  # llama-server's own counters
            for choice in ch.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
                    if first is None:
                        first = time.perf_counter() - t0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = timings.get("cache_n")
    return {"ttft": first, "text": "".join(parts), "prompt_tokens": usage.get("prompt_tokens"), "cached": cached}


def med(xs):
    xs = [x for x in xs if x is not None]
    return median(xs) if xs else None


# ---- 1. multi-turn chat --------------------------------------------------------------------------------------
async def multi_turn(base: str, conversations: int, turns: int, extra: dict, max_tokens=96) -> dict:
    """`conversations` concurrent clients, each running its turns in sequence; every turn sends the
    whole history plus a new ~230-token user message and appends the assistant's answer."""
    import httpx

    async def conversation(c, k: int) -> list[dict]:
        messages, out = [], []
        for t in range(turns):
            messages.append({"role": "user", "content": text(f"user-{k}-{t}", USER_WORDS)})
            r = await chat(c, base, messages, max_tokens, extra)
            messages.append({"role": "assistant", "content": r["text"]})
            out.append(r)
        return out

    async with httpx.AsyncClient() as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(conversation(c, k) for k in range(conversations)))
        dt = time.perf_counter() - t0
    by_turn = [med(conv[t]["ttft"] for conv in res) for t in range(turns)]
    first, last = by_turn[0], by_turn[-1]
    return {
        "conversations": conversations,
        "turns": turns,
        "ttft_by_turn_s": by_turn,
        "ttft_first_s": first,
        "ttft_last_s": last,
        "ttft_ratio": last / first if first and last else None,
        "last_prompt_tokens": med(conv[-1]["prompt_tokens"] for conv in res),
        "last_cached_tokens": med(conv[-1]["cached"] for conv in res),
        "seconds": dt,
    }


# ---- 2. shared system prompt ---------------------------------------------------------------------------------
async def peak_kv(base: str, stop: asyncio.Event) -> float | None:
    """The peak of /health's `kv_cache_bytes_in_use` (in MB), sampled every ~50 ms until `stop`;
    None when the server does not report it (llama-server)."""
    import httpx

    peak = None
    async with httpx.AsyncClient() as c:
        while not stop.is_set():
            try:
                v = (await c.get(f"{base}/health", timeout=10)).json().get("kv_cache_bytes_in_use")
                if v is not None:
                    peak = max(peak or 0, v)
            except (httpx.HTTPError, ValueError):
                pass
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
    return peak / 2**20 if peak is not None else None


async def system_prompts(base: str, n: int, shared: bool, extra: dict, max_tokens=16) -> dict:
    """`n` concurrent requests, each a short distinct question under a ~1,500-token system prompt:
    the same one for all (`shared`) or one of its own each.

    NOTE: a warm-up request goes first, with the shared system prompt (cached, as on a server in
    use) or, for the distinct run, with an unrelated one, so both runs start from one request."""
    import httpx

    systems = [text("system-shared" if shared else f"system-distinct-{i}", SYSTEM_WORDS) for i in range(n)]

    def messages(system: str, i: int) -> list[dict]:
        question = f"Question {i}: what does the text say about the {WORDS[i % 40]}?"
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    async with httpx.AsyncClient() as c:
        warm = text("system-shared" if shared else "system-unrelated", SYSTEM_WORDS)
        await chat(c, base, messages(warm, 999), max_tokens, extra)
        stop = asyncio.Event()
        sampler = asyncio.create_task(peak_kv(base, stop))
        res = await asyncio.gather(*(chat(c, base, messages(s, i), max_tokens, extra) for i, s in enumerate(systems)))
        stop.set()
        peak = await sampler
    return {
        "ttft_p50_s": med(r["ttft"] for r in res),
        "prompt_tokens": med(r["prompt_tokens"] for r in res),
        "cached_tokens": med(r["cached"] for r in res),
        "peak_kv_mb": peak,
    }


# ---- one server configuration ---------------------------------------------------------------------------------
async def workloads(base: str, quick: bool, extra: dict) -> dict:
    import httpx

    n = sizes(quick)
    async with httpx.AsyncClient() as c:  # NOTE: a first request, so turn 1 does not pay a cold start
        await chat(c, base, [{"role": "user", "content": "Hello there."}], 8, extra)
    out = {"multi_turn": await multi_turn(base, n["conversations"], n["turns"], extra)}
    print("    multi-turn:", out["multi_turn"], flush=True)
    sp = {
        "shared": await system_prompts(base, n["requests"], True, extra),
        "distinct": await system_prompts(base, n["requests"], False, extra),
    }
    s, d = sp["shared"]["ttft_p50_s"], sp["distinct"]["ttft_p50_s"]
    sp["requests"], sp["speedup"] = n["requests"], d / s if s and d else None
    out["system_prompt"] = sp
    print("    system prompt:", sp, flush=True)
    return out


def run_ours(options: list[str], threads: int, quick: bool) -> dict | None:
    """Our server on the embedded model with `options` (global options): the workloads' numbers,
    or None (with a line saying why) when this configuration fails to start or to answer."""
    port = 17000 + os.getpid() % 1000
    try:
        proc = start_server([*options, "--max-seqs", "16", "gguf-mistral"], port, threads)
    except RuntimeError as e:
        print(f"  server {' '.join(options) or '(defaults)'} failed ({e}): its numbers are left out", flush=True)
        return None
    try:
        return asyncio.run(workloads(f"http://127.0.0.1:{port}", quick, {}))
    except Exception as e:  # noqa: BLE001 - a configuration that fails costs its numbers, not the run's
        print(f"  server {' '.join(options) or '(defaults)'} failed ({type(e).__name__}: {e})", flush=True)
        return None
    finally:
        proc.terminate()
        proc.wait()


def run_llama_server(gguf: Path, threads: int, quick: bool) -> dict | None:
    """llama-server with `cache_prompt` in every request and 16 slots of 2,560 tokens (the longest
    conversation and its answer fit a slot), or None when it is not built or fails."""
    port = 16000 + os.getpid() % 1000
    return with_llama_server(
        gguf, port, threads, 16 * 2560, lambda base: asyncio.run(workloads(base, quick, {"cache_prompt": True}))
    )


def prefix_cache(gguf: Path, threads: int, quick: bool) -> dict:
    out = {}
    for key, options in (("ours", []), ("ours_no_cache", ["--no-prefix-cache"])):
        print(f"  prefix cache, server {' '.join(options) or '(defaults)'}:", flush=True)
        out[key] = run_ours(options, threads, quick)
    print("  prefix cache, llama-server:", flush=True)
    out["llama_server"] = run_llama_server(gguf, threads, quick)
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def _get(P: dict, key: str, *path):
    v = P.get(key)
    for p in path:
        v = v.get(p) if v else None
    return v


def report_rows(P: dict) -> list[tuple]:
    """bench.report's rows: (name, ours, baseline, baseline name, target); a ratio row's ratio
    column is ours over the baseline's ratio."""
    mt, sp = ("multi_turn", "ttft_ratio"), ("system_prompt", "speedup")
    turns = _get(P, "ours", "multi_turn", "turns") or _get(P, "ours_no_cache", "multi_turn", "turns") or 6
    no_cache, peer = "--no-prefix-cache", "llama-server cache_prompt"
    return [
        (
            f"prefix: chat TTFT turn {turns} / turn 1 (x)",
            _get(P, "ours", *mt),
            _get(P, "ours_no_cache", *mt),
            no_cache,
            "<= 1.5x",
        ),
        ("  the same against llama-server", _get(P, "ours", *mt), _get(P, "llama_server", *mt), peer, "<= 1.5x"),
        (
            "prefix: TTFT distinct / shared system prompt (x)",
            _get(P, "ours", *sp),
            _get(P, "ours_no_cache", *sp),
            no_cache,
            ">= 5x",
        ),
        ("  the same against llama-server", _get(P, "ours", *sp), _get(P, "llama_server", *sp), peer, ">= 5x"),
        (
            "prefix: KV peak MB, shared / distinct system prompts",
            _get(P, "ours", "system_prompt", "shared", "peak_kv_mb"),
            _get(P, "ours", "system_prompt", "distinct", "peak_kv_mb"),
            "distinct prompts",
            "< 1x: shared blocks counted once",
        ),
    ]


def report_lines(P: dict) -> list[str]:
    out = []
    for key, label in (("ours", "ours"), ("ours_no_cache", "ours --no-prefix-cache"), ("llama_server", "llama-server")):
        r = P.get(key)
        if r is None:
            out.append(f"prefix cache, {label}: n/a")
            continue
        m, s = r["multi_turn"], r["system_prompt"]
        out.append(
            f"prefix cache, {label}: chat x{m['conversations']} TTFT turn 1 {_s(m['ttft_first_s'])} -> turn {m['turns']} "
            f"{_s(m['ttft_last_s'])} ({_x(m['ttft_ratio'])}; target <= 1.5x), last turn {_n(m['last_prompt_tokens'])} "
            f"prompt tokens, {_n(m['last_cached_tokens'])} cached; system prompt x{s['requests']} TTFT shared "
            f"{_s(s['shared']['ttft_p50_s'])} / distinct {_s(s['distinct']['ttft_p50_s'])} ({_x(s['speedup'])}; "
            f"target >= 5x), KV peak {_n(s['shared']['peak_kv_mb'])} / {_n(s['distinct']['peak_kv_mb'])} MB"
        )
    return out


def _s(v) -> str:
    return f"{v:.2f}s" if v is not None else "n/a"


def _x(v) -> str:
    return f"{v:.2f}x" if v is not None else "n/a"


def _n(v) -> str:
    return f"{v:.0f}" if v is not None else "n/a"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 conversations x 3 turns, 4 system-prompt requests")
    a = ap.parse_args()
    from mistralrs_py.pipeline.hub import embedded_gguf_path

    P = prefix_cache(embedded_gguf_path(), a.threads, a.quick)
    print(json.dumps(P, indent=2))
    print("\n".join(report_lines(P)))
