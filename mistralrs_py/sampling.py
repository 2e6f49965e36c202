"""Pure sampling functions: logit bias, penalties, temperature, top-k/top-p/min-p, sampling, logprobs.

Every function takes its randomness explicitly (a torch.Generator per sequence). The single-row
functions work on float32 logits of one sequence, [V]; the `*_batch` ones do the same for a whole
step, [S, V], with per-row parameters turned into tensors, and are checked against the single-row
ones row by row.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Protocol, Sequence

import torch
from torch import Tensor


class SamplingOptions(Protocol):
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    repeat_last_n: int
    logit_bias: Mapping[int, float] | None


def is_greedy(p: SamplingOptions) -> bool:
    return p.temperature == 0.0 or p.top_k == 1


def apply_logit_bias(logits: Tensor, bias: Mapping[int, float] | None) -> Tensor:
    # logits: [V]; OpenAI: the bias is added to the logits before sampling (-100 bans, 100 forces).
    if bias:
        ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=logits.device)
        vals = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, vals)
    return logits


def apply_repetition_penalty(logits: Tensor, recent: Sequence[int], penalty: float) -> Tensor:
    """HF/llama.cpp repetition penalty over the recent context: positive logits are divided by the
    penalty, negative ones multiplied, once per distinct token."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    vals = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_presence_frequency(logits: Tensor, output: Sequence[int], presence: float, frequency: float) -> Tensor:
    """OpenAI: logit[t] -= count[t] * frequency + (count[t] > 0) * presence, over generated tokens."""
    if (presence == 0.0 and frequency == 0.0) or not output:
        return logits
    counts = Counter(output)
    ids = torch.tensor(list(counts.keys()), dtype=torch.long, device=logits.device)
    c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, -(c * frequency + presence))


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keeps the smallest set of most likely tokens whose probability adds up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    # NOTE: a token is dropped when the tokens before it already reach p; the top token always stays.
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop_sorted[..., 0] = False  # p <= 0 would drop it too
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drops tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def process_logits(logits: Tensor, p: SamplingOptions, output: Sequence[int], context: Sequence[int]) -> Tensor:
    """logits: [V] float32 raw model logits -> the logits sampling draws from ([V], -inf = banned).

    output: generated token ids so far; context: prompt + output (for the repetition window)."""
    logits = apply_logit_bias(logits, p.logit_bias)
    if p.repetition_penalty != 1.0 and p.repeat_last_n > 0:
        logits = apply_repetition_penalty(logits, context[-p.repeat_last_n :], p.repetition_penalty)
    logits = apply_presence_frequency(logits, output, p.presence_penalty, p.frequency_penalty)
    if is_greedy(p):
        return logits
    logits = logits / p.temperature
    logits = apply_top_k(logits, p.top_k)
    logits = apply_top_p(logits, p.top_p)
    return apply_min_p(logits, p.min_p)


def sample(processed: Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    # processed: [V]
    if greedy:
        return int(processed.argmax())
    token = int(_draw(processed[None].softmax(-1), [generator])[0])
    if token < 0:
        raise ValueError("the sampling distribution is empty or not finite")
    return token


def token_logprobs(raw_logits: Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the top_n alternatives, from the model's logits
    (log-softmax of the raw logits, before penalties and temperature, as vLLM reports them)."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, ids = torch.topk(lp, top_n)
        top = list(zip(ids.tolist(), vals.tolist()))
    return float(lp[token]), top


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """logits: [R, V]; bitmask: int32 [R, ceil(V/32)], bit t of a row set when token t is allowed
    (a grammar's mask) -> logits with every other token at -inf. The input is not modified."""
    allowed = unpack_bitmask(bitmask, logits.shape[1], logits.device)
    return torch.where(allowed, logits, float("-inf"))


def unpack_bitmask(bitmask: Tensor, V: int, device: torch.device, gather: bool | None = None) -> Tensor:
    """int32 [R, W] -> bool [R, V] on `device`. NOTE: read as bytes (little-endian int32: token t is
    bit t % 8 of byte t // 8). On the CPU numpy unpacks them (~0.1 ms for 16 rows of a 49k
    vocabulary); on a GPU (or with gather=True) a 256 x 8 table is gathered."""
    if gather is None:
        gather = device.type != "cpu" or bitmask.device.type != "cpu"
    if not gather:
        import numpy as np

        bits = np.unpackbits(bitmask.contiguous().numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)[:, :V]
    data = bitmask.to(device, non_blocking=True).contiguous().view(torch.uint8)
    return _byte_bits(device)[data.long()].view(bitmask.shape[0], -1)[:, :V]


_BYTE_BITS: dict[torch.device, Tensor] = {}


def _byte_bits(device: torch.device) -> Tensor:
    """[256, 8] bool: entry [b, j] is bit j of byte b."""
    table = _BYTE_BITS.get(device)
    if table is None:
        b = torch.arange(256, dtype=torch.int32)
        table = _BYTE_BITS[device] = ((b[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(device)
    return table


# ---- the whole batch at once ----------------------------------------------------------------------
def _draw(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """probs: [R, V] (rows sum to ~1) -> [R] token ids by inverse CDF, -1 for a row whose
    distribution is empty or not finite. One uniform per row, from that row's own generator."""
    # NOTE: one draw per row from its own generator keeps a seeded sequence reproducible whatever
    # else is in the batch, and the single-row `sample` draws the same way, so the two agree.
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])[:, None]
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # NOTE: u < 1, but u * total can round up to total; nextafter keeps the target strictly below
    # it, so the first cdf entry above the target exists and its token has a positive probability
    # (a zero-probability token repeats the previous cdf value and is never the first one above).
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    ok = torch.isfinite(total[:, 0]) & (total[:, 0] > 0)
    return torch.where(ok, idx, torch.full_like(idx, -1))


def _penalize_batch(
    logits: Tensor,
    params: Sequence[SamplingOptions],
    outputs: Sequence[Sequence[int]],
    contexts: Sequence[Sequence[int]],
) -> Tensor:
    """logits: [S, V] -> [S, V] with logit bias, repetition and presence/frequency penalties for the
    whole batch in a few ops, skipped when no row uses them. The input is never modified."""
    S, V = logits.shape
    # NOTE: every (row, token) a penalty touches becomes a flat index r * V + t into the batch and
    # one value: the bias, the repetition penalty, or -(count * frequency + presence). They go to
    # the device in two copies and only those entries are touched: a dense [S, V] count tensor
    # would cost several full passes over the logits, which is what dominates on a CPU.
    ids: list[int] = []
    vals: list[float] = []
    sizes = [0, 0, 0]  # bias, repetition, presence/frequency

    def add(kind: int, r: int, tokens: list[int], values) -> None:
        # NOTE: an id outside the vocabulary would land in another row; the single-row functions raise, so do we.
        if tokens and (min(tokens) < 0 or max(tokens) >= V):
            raise ValueError(f"token id outside the vocabulary (0..{V - 1}) in row {r}")
        ids.extend(r * V + t for t in tokens)
        vals.extend(values)
        sizes[kind] += len(tokens)

    for r, p in enumerate(params):
        if p.logit_bias:
            add(0, r, list(p.logit_bias.keys()), p.logit_bias.values())
    for r, p in enumerate(params):
        if p.repetition_penalty != 1.0 and p.repeat_last_n > 0 and contexts[r]:
            window = sorted(set(contexts[r][-p.repeat_last_n :]))  # once per distinct token
            add(1, r, window, [p.repetition_penalty] * len(window))
    for r, p in enumerate(params):
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and outputs[r]:
            counts = Counter(outputs[r])
            add(2, r, list(counts), [-(c * p.frequency_penalty + p.presence_penalty) for c in counts.values()])
    if not ids:
        return logits
    flat = torch.tensor(ids, dtype=torch.long, device=logits.device)
    val = torch.tensor(vals, dtype=logits.dtype, device=logits.device)
    nb, nr = sizes[0], sizes[0] + sizes[1]
    x = logits.reshape(-1).clone()
    if sizes[0]:
        x.index_add_(0, flat[:nb], val[:nb])
    if sizes[1]:
        i, pen = flat[nb:nr], val[nb:nr]
        v = x[i]  # after the bias, as process_logits; the ids are distinct, so the write-back is well defined
        x[i] = torch.where(v > 0, v / pen, v * pen)
    if sizes[2]:
        x.index_add_(0, flat[nr:], val[nr:])
    return x.view(S, V)


def _filter_batch(logits: Tensor, params: Sequence[SamplingOptions]) -> Tensor:
    """logits: [R, V] of sampled (not greedy) rows -> temperature, top-k, top-p, min-p applied per row,
    in process_logits' order. Only the rows using top-k or top-p are sorted, once."""
    R, V = logits.shape
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]  # V: off
    # NOTE: one host-to-device copy for all per-row values; k < 2**24 is exact in float32.
    pv = torch.tensor(
        [[p.temperature, k, p.top_p, p.min_p] for p, k in zip(params, ks)], dtype=logits.dtype, device=logits.device
    )
    x = logits / pv[:, 0:1]
    rows = [r for r, p in enumerate(params) if ks[r] < V or p.top_p < 1.0]
    if rows:
        idx = None if len(rows) == R else torch.tensor(rows, dtype=torch.long, device=x.device)
        sub, spv = (x, pv) if idx is None else (x[idx], pv[idx])
        kmax = max(ks[r] for r in rows)
        # NOTE: when every sorted row has a top-k, topk(largest k) stands in for the full sort (much
        # cheaper on CPU): tokens past a row's k are banned anyway and top-p only sees the kept ones.
        # Unlike apply_top_k it cannot keep a token tied with the k-th one beyond position k.
        sv, order = torch.topk(sub, kmax) if kmax < V else torch.sort(sub, dim=-1, descending=True)
        kth = sv.gather(1, spv[:, 1:2].long().clamp(max=kmax) - 1)
        sv = sv.masked_fill(sv < kth, float("-inf"))
        probs = sv.softmax(-1)
        top_p = spv[:, 2:3]
        # NOTE: as apply_top_p: a token is dropped when the tokens before it already reach p. Rows
        # with p >= 1 are off (the float cumsum may pass 1 early), and the top token always stays.
        drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
        drop[:, 0] = False
        sv = sv.masked_fill(drop, float("-inf"))
        sub = torch.full_like(sub, float("-inf")).scatter_(1, order, sv)
        x = sub if idx is None else x.index_copy(0, idx, sub)
    if any(p.min_p > 0.0 for p in params):
        probs = x.softmax(-1)
        # NOTE: min_p is capped at 1 so the top token always stays (a row with nothing left cannot be sampled).
        floor = pv[:, 3:4].clamp(max=1.0) * probs.max(-1, keepdim=True).values
        x = x.masked_fill(probs < floor, float("-inf"))
    return x


def argmax_rows(x: Tensor) -> Tensor:
    """x.argmax(-1) of a [S, V] tensor: on the CPU through our kernel when it is loaded (torch's
    CPU argmax is not vectorised: a greedy step's pass over 16 rows of logits took ~1 ms, 20x its
    amax), with torch's answer (the first maximum, or the first NaN)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0:
        op = getattr(torch.ops.mistralrs, "argmax_rows", None)
        if op is not None:
            return op(x)
    return x.argmax(-1)


def _sampled_rows(params: Sequence[SamplingOptions]) -> list[int]:
    return [r for r, p in enumerate(params) if not is_greedy(p)]


def sample_batch(
    logits: Tensor,
    params: Sequence[SamplingOptions],
    outputs: Sequence[Sequence[int]],
    contexts: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> Tensor:
    """logits: [S, V] float32 raw logits -> [S] token ids on the logits' device: argmax of the
    penalized logits for greedy rows, an inverse-CDF draw from the processed distribution for the
    others, -1 for a row whose distribution is empty or not finite (the caller decides; the
    single-row `sample` raises for it). Nothing is read back to the host here."""
    S = logits.shape[0]
    if not (len(params) == len(outputs) == len(contexts) == len(generators) == S):
        raise ValueError("sample_batch needs one params, output, context and generator per row")
    x = _penalize_batch(logits.float(), params, outputs, contexts)
    rows = _sampled_rows(params)
    if not rows:
        return argmax_rows(x)
    sub = [params[r] for r in rows]
    gens = [generators[r] for r in rows]
    if len(rows) == S:
        return _draw(_filter_batch(x, sub).softmax(-1), gens)
    idx = torch.tensor(rows, dtype=torch.long, device=x.device)
    # NOTE: argmax of every row (one cheap pass), then the sampled rows are overwritten.
    return argmax_rows(x).index_copy(0, idx, _draw(_filter_batch(x[idx], sub).softmax(-1), gens))


def batch_token_logprobs(
    raw_logits: Tensor, tokens: Tensor, top_ns: Sequence[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Row-wise token_logprobs: raw_logits [R, V], tokens [R] (on the logits' device), top_ns[r]
    alternatives for row r -> per row (chosen logprob, [(id, logprob)] best first)."""
    R, V = raw_logits.shape
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    cols = [lp.gather(1, tokens.view(R, 1).long())]
    n = min(max(top_ns, default=0), V)
    if n > 0:
        vals, ids = torch.topk(lp, n)
        cols += [vals, ids]
    # NOTE: one host read for the whole batch; float64 holds the float32 values and the ids exactly.
    host = torch.cat([c.double() for c in cols], dim=1).tolist()
    out = []
    for row, k in zip(host, top_ns):
        k = min(k, n)
        out.append((row[0], [(int(i), v) for v, i in zip(row[1 : 1 + k], row[1 + n : 1 + n + k])]))
    return out
