"""Pure sampling functions: logit bias, penalties, temperature, top-k/top-p/min-p, sampling, logprobs.

Every function takes its randomness explicitly (a torch.Generator per sequence) and works on
float32 logits of one sequence, [V], or of a batch, [S, V].
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


def needs_processing(p: SamplingOptions) -> bool:
    """False when sampling reduces to argmax of the raw logits (the batched fast path)."""
    return not (
        is_greedy(p)
        and not p.logit_bias
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.repetition_penalty == 1.0
    )


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
    probs = processed.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(raw_logits: Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the top_n alternatives, from the model's logits
    (log-softmax of the raw logits, before penalties and temperature, as vLLM reports them)."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, ids = torch.topk(lp, top_n)
        top = list(zip(ids.tolist(), vals.tolist()))
    return float(lp[token]), top
