"""In-situ quantization (`--isq`): a dense weight quantized at load time into llama.cpp's block
formats, so that a safetensors checkpoint runs on the same kernels as a GGUF file.

Q4_0 and Q8_0 are the gguf package's own quantizers (llama.cpp's reference ones). Q4_K has none
there: ours below follows the format llama.cpp defines (super-blocks of 256 values, 8 sub-blocks
of 32 with 6-bit scales and mins, fp16 super-scales), choosing each sub-block's scale and min from
its range so that nothing clips (llama.cpp's own quantizer also searches around it, for slightly
lower error).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

ISQ_TYPES = {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K}
BLOCK = {Q.Q4_0: 32, Q.Q8_0: 32, Q.Q4_K: 256, Q.Q5_0: 32}
# NOTE: as llama.cpp's quantizer: a weight whose rows are not whole Q4_K super-blocks takes Q5_0
_FALLBACK = {Q.Q4_K: Q.Q5_0}


def isq_type(name: str) -> int:
    try:
        return int(ISQ_TYPES[name.lower()])
    except KeyError:
        raise ValueError(f"unknown --isq type {name!r}; choose one of {', '.join(ISQ_TYPES)}") from None


def quantizable(shape: tuple[int, ...], qtype: int) -> bool:
    """A [out, in] weight whose rows split into whole blocks of `qtype`."""
    return len(shape) == 2 and shape[1] % BLOCK[Q(qtype)] == 0


def type_for(shape: tuple[int, ...], qtype: int) -> int | None:
    """The type a weight of `shape` gets under `qtype`: itself, its fallback, or None (stays dense)."""
    for t in (Q(qtype), _FALLBACK.get(Q(qtype))):
        if t is not None and quantizable(shape, t):
            return int(t)
    return None


# NOTE: rows quantized at a time: the quantizers' float temporaries stay a few MB whatever the weight
# (an output head of 49k x 576 would otherwise take ~0.5 GB of them at once)
_ROWS = 1024


def quantize(w: torch.Tensor, qtype: int) -> np.ndarray:
    """w: [N, K] -> the GGUF bytes of the weight, [N, K / block * block bytes] uint8."""
    parts = []
    for start in range(0, w.shape[0], _ROWS):
        x = w[start : start + _ROWS].detach().to(torch.float32).cpu().numpy()
        parts.append(quantize_q4_k(x) if Q(qtype) == Q.Q4_K else quants.quantize(x, Q(qtype)))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """x rounded to float16, upwards (so that scales derived from it never clip)."""
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    N, K = x.shape
    blocks = x.reshape(-1, 8, 32)  # super-blocks of 8 sub-blocks of 32
    lo = np.minimum(blocks.min(-1), 0.0)  # NOTE: as llama.cpp, a sub-block's min is never above 0
    hi = blocks.max(-1)
    # NOTE: the 6-bit min is rounded up and the 6-bit scale then covers [-min, max] from it, so no
    # value is clipped and each is within half a step of its level
    dmin = _f16_at_least(-lo.min(-1) / 63.0)
    dminf = dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(dminf > 0, np.ceil(-lo / dminf), 0).clip(0, 63)
        top = hi + dminf * m  # the range the 16 levels must reach
        d = _f16_at_least(top.max(-1) / (15.0 * 63.0))
        df = d.astype(np.float32)[:, None]
        sc = np.where(df > 0, np.ceil(top / 15.0 / df), 0).clip(0, 63)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.rint((blocks + (dminf * m)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    packed = np.empty((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    qs = q.reshape(-1, 4, 2, 32)
    qs = qs[:, :, 0] | (qs[:, :, 1] << 4)  # sub-block 2c in the low nibbles, 2c + 1 in the high ones
    out = np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs.reshape(-1, 128)], axis=1
    )
    return out.reshape(N, -1)
