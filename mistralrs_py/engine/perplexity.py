"""Answer quality as llama.cpp measures it (`llama-perplexity`, with `--kl-divergence`): perplexity
over a text and, against a reference run of the same weights (float32), the mean KL divergence of
the next-token distributions and how often their top tokens agree.

    report = measure(pipe, ids, ctx=512, reference=float32_pipe)

The text is cut into chunks of `ctx` tokens; each chunk is one prefill through the serving path (the
same forward, cache and kernels as a request), and, as llama.cpp does, only the second half of each
chunk is scored (the first half is context), with the chunk's first token replaced by BOS where the
model starts from one. Numbers are then comparable with llama-perplexity's on the same file and text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..pipeline.base import Pipeline
from .kv_cache import KVCachePool


@dataclass
class QualityReport:
    tokens: int  # scored tokens
    chunks: int
    ppl: float
    ppl_err: float  # one standard error, as llama-perplexity prints it
    ref_ppl: Optional[float] = None
    kld: Optional[float] = None  # mean KL(reference || this), nats per token
    kld_err: Optional[float] = None
    top1: Optional[float] = None  # fraction of tokens whose most likely next token is the reference's

    def lines(self) -> list[str]:
        out = [f"{self.tokens} tokens scored in {self.chunks} chunks", f"PPL = {self.ppl:.4f} +/- {self.ppl_err:.4f}"]
        if self.kld is not None:
            out += [
                f"reference (float32) PPL = {self.ref_ppl:.4f}; PPL ratio = {self.ppl / self.ref_ppl:.5f}",
                f"mean KLD = {self.kld:.6f} +/- {self.kld_err:.6f}",
                f"same top token = {100 * self.top1:.3f}%",
            ]
        return out


def chunks(ids: list[int], ctx: int, bos: Optional[int]) -> Iterator[list[int]]:
    """Whole chunks of `ctx` tokens (a shorter tail is left out, as llama.cpp does)."""
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = list(ids[start : start + ctx])
        if bos is not None:
            chunk[0] = bos
        yield chunk


def chunk_bos(tok) -> Optional[int]:
    """NOTE: llama.cpp starts each chunk from BOS when the model's prompts start with one."""
    starts_with_bos = tok.add_bos if tok.add_bos is not None else tok.encode("a")[:1] == [tok.bos_id]
    return tok.bos_id if starts_with_bos and tok.bos_id is not None else None


@torch.inference_mode()
def chunk_logprobs(pipe: Pipeline, chunk: list[int], pool: KVCachePool) -> torch.Tensor:
    """float32 log-softmax of every row of one prefill of `chunk` -> [len(chunk), V]."""
    pipe.begin_slot(0)
    try:
        view = pool.build_view([], [(0, 0, len(chunk))], pipe.config.sliding_window, ["all"])
        logits = pipe.forward(torch.tensor(chunk, dtype=torch.long, device=pipe.device), view, pool)
        return torch.log_softmax(logits.float(), -1).cpu()
    finally:
        pipe.end_slot(0)  # NOTE: the next chunk overwrites slot 0's blocks from position 0


def measure(pipe: Pipeline, ids: list[int], ctx: int, reference: Optional[Pipeline] = None) -> QualityReport:
    ctx = min(ctx, pipe.max_model_len)
    if len(ids) < ctx:
        raise ValueError(f"the text has {len(ids)} tokens; at least one chunk of {ctx} is needed (lower the context)")
    bos = chunk_bos(pipe.tokenizer)
    pool = (pipe.pool_type or KVCachePool).for_pipeline(pipe, 1)
    ref_pool = (reference.pool_type or KVCachePool).for_pipeline(reference, 1) if reference is not None else None
    first = ctx // 2
    nll, ref_nll, kld, same = [], [], [], []
    n_chunks = 0
    for chunk in chunks(ids, ctx, bos):
        n_chunks += 1
        lp = chunk_logprobs(pipe, chunk, pool)[first:-1]  # NOTE: row j predicts token j + 1
        targets = torch.tensor(chunk[first + 1 :])
        nll += (-lp.gather(1, targets[:, None])[:, 0]).tolist()
        if reference is not None:
            ref = chunk_logprobs(reference, chunk, ref_pool)[first:-1]
            ref_nll += (-ref.gather(1, targets[:, None])[:, 0]).tolist()
            kld += (ref.exp() * (ref - lp)).sum(-1).clamp(min=0).tolist()
            same += (ref.argmax(-1) == lp.argmax(-1)).tolist()
    mean, err = _mean_err(nll)
    report = QualityReport(len(nll), n_chunks, math.exp(mean), math.exp(mean) * err)
    if reference is not None:
        report.ref_ppl = math.exp(_mean_err(ref_nll)[0])
        report.kld, report.kld_err = _mean_err(kld)
        report.top1 = sum(same) / len(same)
    return report


def _mean_err(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / max(n - 1, 1)
    return mean, math.sqrt(var / n)
