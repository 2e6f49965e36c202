"""Runs a scheduled step on the model: the scheduler's cache decisions applied to the tensors, one
forward pass, and every row sampled in one batched call. The only engine code that touches tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .. import sampling
from ..pipeline.base import Pipeline
from .graphs import DecodeGraphs
from .kv_cache import KVCachePool
from .request import TokenLogprob
from .scheduler import SchedulerOutput
from .sequence import Sequence

log = logging.getLogger("mistralrs.engine")

Sample = tuple[int, TokenLogprob | None]


@dataclass
class StepResult:
    # one per SchedulerOutput.sampled row: the sampled token (and its logprobs), or why that row failed
    samples: list[Sample | Exception] = field(default_factory=list)
    error: Exception | None = None  # the forward pass failed: every sequence of the step fails


class ModelRunner:
    def __init__(self, pipeline: Pipeline, pool: KVCachePool, graphs: DecodeGraphs | None):
        self.pipe, self.pool, self.graphs = pipeline, pool, graphs
        self.window = pipeline.config.sliding_window

    def release(self, slot: int) -> dict | None:
        """The sequence in `slot` ended: its pipeline state is closed (its report returned: X-LoRA's
        mean scalings) and its cache pages handed back."""
        report = self.pipe.end_slot(slot)
        self.pool.release(slot)
        return report

    def execute(self, out: SchedulerOutput) -> StepResult:
        for slot in out.freed:
            self.release(slot)
        for seq in out.admitted:
            self.pipe.begin_slot(seq.slot)
        for src, dst, n in out.copies:
            self.pool.copy_prefix(src, dst, n)
        if out.empty:
            return StepResult()
        try:
            logits = self._forward(out)
        except Exception as e:  # noqa: BLE001 - a failed forward fails its batch, not the server
            log.exception("forward failed")
            return StepResult(error=e)
        return StepResult(self._sample(out.sampled, logits))

    def _forward(self, out: SchedulerOutput) -> torch.Tensor:
        """-> float32 logits [rows, V] of the step's sampled rows, in order."""
        ids: list[int] = [s.tokens[-1] for s in out.decode]
        decode = [(s.slot, len(s.tokens) - 1) for s in out.decode]
        prefill, want = [], []
        for seq, start, n in out.prefill:
            ids.extend(seq.tokens[start : start + n])
            prefill.append((seq.slot, start, n))
            want.append(start + n == len(seq.tokens))
        if self.graphs is not None and not prefill and self.graphs.fits(len(decode), max(p for _, p in decode) + 1):
            return self.graphs.run(ids, decode)  # NOTE: a decode-only step: static buffers, a graph
        view = self.pool.build_view(decode, prefill, self.window, want)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.pipe.device)
        return self.pipe.forward(input_ids, view, self.pool)

    # ---- sampling ------------------------------------------------------------------------------
    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[Sample | Exception]:
        try:
            batch = self._sample_batch(rows, logits)
        except Exception:  # noqa: BLE001 - one bad row must not fail the others: retry row by row
            log.warning("batched sampling failed; sampling this step row by row", exc_info=True)
            batch = [None] * len(rows)
        out: list[Sample | Exception] = []
        for r, seq in enumerate(rows):
            # NOTE: a row the batch could not sample (None) is sampled alone, where a bad setup
            # raises and fails this sequence only.
            try:
                out.append(batch[r] if batch[r] is not None else self._sample_row(seq, logits[r]))
            except Exception as e:  # noqa: BLE001 - reported to this sequence alone
                log.exception("sampling failed")
                out.append(e)
        return out

    def _sample_batch(self, rows: list[Sequence], logits: torch.Tensor) -> list[Sample | None]:
        """Samples every row of the step in one batched call (greedy without penalties is a plain
        argmax); None for a row whose distribution is empty or not finite."""
        if not rows:
            return []
        logits = logits[: len(rows)]
        params = [s.params for s in rows]
        # NOTE: output ids are copied out only for rows with presence/frequency penalties.
        outputs = [s.output_ids if p.presence_penalty or p.frequency_penalty else [] for s, p in zip(rows, params)]
        tokens = sampling.sample_batch(logits, params, outputs, [s.tokens for s in rows], [s.generator for s in rows])
        want = [r for r, p in enumerate(params) if p.logprobs]
        lps = {}
        if want:
            idx = torch.tensor(want, dtype=torch.long, device=logits.device)
            top_ns = [params[r].top_logprobs for r in want]
            got = sampling.batch_token_logprobs(logits[idx], tokens[idx].clamp(min=0), top_ns)
            lps = dict(zip(want, got))
        ids = tokens.tolist()  # NOTE: the step's one host read of the sampled tokens
        return [None if t < 0 else (t, TokenLogprob(t, *lps[r]) if r in lps else None) for r, t in enumerate(ids)]

    def _sample_row(self, seq: Sequence, row: torch.Tensor) -> Sample:
        """One row alone: the fallback when the batch fails, so a bad row fails by itself."""
        p = seq.params
        processed = sampling.process_logits(row, p, seq.output_ids, seq.tokens)
        token = sampling.sample(processed, sampling.is_greedy(p), seq.generator)
        lp = None
        if p.logprobs:
            logprob, top = sampling.token_logprobs(row, token, p.top_logprobs)
            lp = TokenLogprob(token, logprob, top)
        return token, lp
