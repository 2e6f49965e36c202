"""Timing of QuantLinear's kernels against dense bf16 F.linear, one thread, decode-sized inputs.

Run from the repository root: `python -m bench.quant_kernels` (or `python bench/quant_kernels.py`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # NOTE: run as a script: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T

from mistralrs_py.models.ggml_blocks import dequantize  # noqa: E402
from mistralrs_py.models.quant import QuantLinear  # noqa: E402


def bench(f, n):  # best of 5 rounds (the machine is shared): microseconds per call
    for _ in range(5):
        f()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            f()
        best = min(best, (time.perf_counter() - t0) / (n // 5) * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [
        (T.Q4_1, 576, 1536, "auto"),
        (T.Q4_1, 1536, 576, "auto"),
        (T.Q4_K, 576, 1536, "auto"),
        (T.Q5_0, 576, 1536, "auto"),
        (T.Q8_0, 576, 1536, "auto"),
        (T.Q8_0, 576, 1536, "fast"),
        (T.Q6_K, 576, 1536, "auto"),
        (T.Q4_1, 4096, 4096, "auto"),
    ]
    for qt, N, K, prefer in cases:
        W = torch.randn(N, K) * 0.02
        if qt in (T.Q4_K, T.Q6_K):  # no python quantizer for K-quants: random blocks, sane d/dmin
            bs, ts = GGML_QUANT_SIZES[qt]
            raw = np.random.randint(0, 256, (N * K // bs, ts), dtype=np.uint8)
            for p in (0, 2) if qt == T.Q4_K else (208,):
                raw[:, p : p + 2] = np.full((len(raw), 1), 1e-3, np.float16).view(np.uint8)
        else:
            raw = gguf.quants.quantize(W.numpy(), qt)
        ql = QuantLinear.from_gguf(raw, qt, (N, K), torch.bfloat16, torch.device("cpu"), prefer=prefer)
        Wd = dequantize(raw, qt, (N, K)).to(torch.bfloat16)
        for M in (1, 8):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            n = 20 if N * K > 4e6 else 200
            tq, td = bench(lambda ql=ql, x=x: ql(x), n), bench(lambda x=x, Wd=Wd: F.linear(x, Wd), n)
            print(
                f"{qt.name:4s} W[{N}x{K}] x[{M}x{K}]: {ql.kind:52s} {tq:7.1f} us | "
                f"dense bf16 F.linear {td:7.1f} us | speed-up {td / tq:4.2f}x"
            )


if __name__ == "__main__":
    main()
