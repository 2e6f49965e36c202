"""`make bench`'s step breakdown: where a decode step's time goes, at 1, 16 and 64 streams, for each
way we keep the embedded model's weights (bf16 safetensors, the GGUF's Q4_1 blocks on our 4-bit
kernel, `--isq q8_0` on our 8-bit one), with the floor each part could reach on this machine.

A decode step is timed whole (wall clock, no profiler), and its forward pass and sampling are timed
around the model runner's own calls. One more set of steps runs under torch.profiler, whose
self-times of the ops split the forward pass: matmuls (every projection and the output head),
attention (the decode attention op), norms and activations; whatever else the step takes is "the
rest": Python, the scheduler, allocation and the dispatch of the small ops (embedding lookup,
indexing, copies). Floors, from this machine's memory bandwidth and matmul throughput measured in
the same run: matmuls read every weight byte once per step and, dense, do 2 * rows * weights FLOPs
at torch's best matmul speed here (the larger of the two; quantized weights: the read alone); attention reads every cached key and value once; norms and sampling read their
activations or logits once.

Run alone: `python -m bench.profile [--threads 2]`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import CACHE, export_hf, median  # noqa: E402
from mistralrs_py.engine.engine import Engine  # noqa: E402
from mistralrs_py.engine.request import Error, Request, SamplingParams  # noqa: E402
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline  # noqa: E402

STREAMS = (1, 16, 64)
PARTS = ("matmuls", "attention", "norms/activations", "sampling", "rest")
_MATMUL = {
    "mistralrs::qmm",
    "mistralrs::linear",
    "mistralrs::lora_linear",
    "mistralrs::lora_add_",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
}
_ATTENTION = {
    "mistralrs::decode_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_softmax",
}
_NORMS = {"mistralrs::rms_norm", "mistralrs::silu_mul", "aten::silu", "aten::rsqrt", "aten::mean", "aten::pow"}


def machine_limits(threads: int) -> dict:
    """Read bandwidth (a sum over 1 GiB) and float32 / bf16 matmul throughput (2048^2 x 2048)."""
    x = torch.ones(2**28)
    x.sum()
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        t.append(time.perf_counter() - t0)
    bw = x.numel() * 4 / min(t)
    del x
    out = {"read_gb_s": bw / 1e9}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            t.append(time.perf_counter() - t0)
        out[f"{str(dt).removeprefix('torch.')}_gflop_s"] = 2 * 2048**3 / min(t) / 1e9
    return out


def weight_bytes_and_count(pipe) -> tuple[int, int]:
    """Bytes a decode step reads for its projections and head (as stored), and their weights' count."""
    from mistralrs_py.models.quant import QuantLinear

    nbytes = count = 0
    model = pipe.network()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            k = m.kernel
            nbytes += sum(t.numel() * t.element_size() for t in vars(k).values() if isinstance(t, torch.Tensor))
            count += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear) or type(m).__name__ == "Linear":
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                nbytes += w.numel() * w.element_size()
                count += w.numel()
    head = getattr(model, "lm_head", None)
    if head is not None and not isinstance(head, (QuantLinear, torch.nn.Linear)) and type(head).__name__ != "Linear":
        w = getattr(head, "weight", None)  # NOTE: a tied head that reads the embedding
        if isinstance(w, torch.Tensor):
            nbytes += w.numel() * w.element_size()
            count += w.numel()
    return nbytes, count


def quantized(pipe) -> bool:
    from mistralrs_py.models.quant import QuantLinear

    return any(isinstance(m, QuantLinear) for m in pipe.network().modules())


class Timed:
    """Wall time of the model runner's forward and sampling calls, per step."""

    def __init__(self, runner):
        self.forward, self.sample = [], []
        fwd, smp = runner._forward, runner._sample

        def forward(out):
            t0 = time.perf_counter()
            try:
                return fwd(out)
            finally:
                self.forward.append(time.perf_counter() - t0)

        def sample(*a, **k):
            t0 = time.perf_counter()
            try:
                return smp(*a, **k)
            finally:
                self.sample.append(time.perf_counter() - t0)

        runner._forward, runner._sample = forward, sample


def breakdown(pipe, streams: int, limits: dict, steps: int = 8) -> dict:
    eng = Engine(pipe, max_seqs=max(streams, 1), prefix_caching=False)
    tok = pipe.tokenizer
    prompt = tok.encode("Tell me a long story about the sea.", add_special_tokens=False)[:16]
    total = 4 + 2 * steps + 8
    for i in range(streams):

        def emit(ev):
            if isinstance(ev, Error):
                raise RuntimeError(ev.message)

        params = SamplingParams(max_tokens=total, temperature=0, ignore_eos=True)
        eng.add_request(Request(f"p{streams}-{i}", [*prompt, 10 + i], params, emit))
    eng._drain(block=False)
    while eng.scheduler.waiting or not all(s.is_decoding for s in eng.scheduler.running):
        eng.step()  # NOTE: prompts first: every step timed below decodes all streams
    for _ in range(2):
        eng.step()
    assert len(eng.scheduler.running) == streams
    timed = Timed(eng.runner)
    wall = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        wall.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    ops = {"matmuls": 0.0, "attention": 0.0, "norms/activations": 0.0}
    for e in prof.key_averages():
        part = (
            "matmuls"
            if e.key in _MATMUL
            else "attention"
            if e.key in _ATTENTION
            else "norms/activations"
            if e.key in _NORMS
            else None
        )
        if part:
            ops[part] += e.self_cpu_time_total / 1e6 / steps
    step = median(wall)
    sample = median(timed.sample[:steps])
    parts = {**ops, "sampling": sample}
    parts["rest"] = max(0.0, step - sum(parts.values()))
    ctx = len(prompt) + 1 + total // 2
    c = pipe.config
    kv_bytes = (
        streams
        * ctx
        * c.num_layers
        * 2
        * c.num_kv_heads
        * c.head_dim
        * torch.empty((), dtype=pipe.dtype).element_size()
    )
    wbytes, wcount = weight_bytes_and_count(pipe)
    bw = limits["read_gb_s"] * 1e9
    # NOTE: dense weights: the faster of torch's float32 and bf16 matmuls (bf16 weights widen to
    # float32 for free next to their reads). Quantized ones: memory only (the int8 dot products
    # have no reference here: torch's CPU int8 matmul runs at ~1 GFLOP/s).
    peak = max(limits["bfloat16_gflop_s"], limits["float32_gflop_s"]) * 1e9
    compute = 0.0 if quantized(pipe) else 2 * streams * wcount / peak
    floors = {
        "matmuls": max(wbytes / bw, compute),
        "attention": kv_bytes / bw,
        "norms/activations": streams * c.num_layers * 4 * c.hidden_size * 4 / bw,
        "sampling": streams * c.vocab_size * 4 / bw,
        "rest": 0.0,
    }
    return {
        "streams": streams,
        "step_ms": step * 1e3,
        "tok_s": streams / step,
        "forward_ms": median(timed.forward[:steps]) * 1e3,
        "parts_ms": {k: v * 1e3 for k, v in parts.items()},
        "floor_ms": {k: v * 1e3 for k, v in floors.items()},
        "weights_mb": wbytes / 2**20,
    }


def configs() -> dict[str, ModelSpec]:
    hf = str(export_hf(CACHE / "smollm2-bf16"))
    return {
        "bf16 safetensors (mistral --dtype bfloat16)": ModelSpec(
            ModelKind.PLAIN, model_id=hf, dtype="bfloat16", device="cpu"
        ),
        "GGUF Q4_1, default (gguf-mistral)": ModelSpec(ModelKind.GGUF, device="cpu"),
        "--isq q8_0 (mistral, default dtype)": ModelSpec(ModelKind.PLAIN, model_id=hf, isq="q8_0", device="cpu"),
    }


def profile(threads: int) -> dict:
    torch.set_num_threads(threads)
    R = {"limits": machine_limits(threads), "configs": {}}
    for name, spec in configs().items():
        pipe = load_pipeline(spec)
        R["configs"][name] = {
            "kernels": pipe.summary["format"],
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "rows": [breakdown(pipe, s, R["limits"]) for s in STREAMS],
        }
        del pipe
    return R


def report_lines(R: dict) -> list[str]:
    lim = R["limits"]
    out = [
        f"decode step breakdown (machine: read {lim['read_gb_s']:.1f} GB/s, matmul {lim['float32_gflop_s']:.0f} GFLOP/s "
        f"float32 / {lim['bfloat16_gflop_s']:.0f} bf16; ms per step, share of the step, floor)"
    ]
    for name, cfg in R["configs"].items():
        out.append(f"  {name} [{cfg['dtype']}; {cfg['kernels'][:90]}]")
        for r in cfg["rows"]:
            step = r["step_ms"]
            cells = ", ".join(
                f"{p} {r['parts_ms'][p]:.2f} ({100 * r['parts_ms'][p] / step:.0f}%; floor {r['floor_ms'][p]:.2f})"
                for p in PARTS
            )
            floor = sum(r["floor_ms"].values())
            out.append(
                f"    {r['streams']:>2} streams: step {step:.2f} ms = {r['tok_s']:.0f} tok/s (floor {floor:.2f} ms = "
                f"{r['streams'] / floor * 1e3:.0f} tok/s): {cells}"
            )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    R = profile(a.threads)
    print(json.dumps(R, indent=1))
    print("\n".join(report_lines(R)))
