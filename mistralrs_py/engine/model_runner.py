"""Runs a scheduled step on the model: the scheduler's cache decisions applied to the tensors, one
forward pass, and every row sampled in one batched call. The only engine code that touches tensors."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import sampling
from ..pipeline.base import Pipeline
from .grammar import GrammarFailed, fill_masks, grammar_failure, mask_words
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
    # prompt logprobs computed this step: (sequence, first prompt token scored, logprobs of its tokens
    # first, first + 1, ...)
    prompt_logprobs: list[tuple[Sequence, int, list[TokenLogprob]]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, pipeline: Pipeline, pool: KVCachePool, graphs: DecodeGraphs | None):
        self.pipe, self.pool, self.graphs = pipeline, pool, graphs
        self.window = pipeline.config.sliding_window
        self.vocab_size = pipeline.config.vocab_size
        self._masker: ThreadPoolExecutor | None = None  # started by the first constrained sequence

    def release(self, slot: int) -> dict | None:
        """The sequence in `slot` ended: its pipeline state is closed (its report returned: X-LoRA's
        mean scalings)."""
        return self.pipe.end_slot(slot)

    def release_blocks(self, blocks: list[int]) -> None:
        """Blocks that left the cache: their pages are handed back (on the CPU)."""
        self.pool.release_blocks(blocks)

    def execute(self, out: SchedulerOutput) -> StepResult:
        for slot in out.freed:
            self.release(slot)
        self.release_blocks(out.released_blocks)
        if self.pipe.reads_whole_blocks:
            self.pool.zero_blocks(out.fresh_blocks)
        self.pipe.reset_blocks(out.fresh_blocks)
        for seq in out.admitted:
            self.pipe.begin_slot(seq.slot, seq.tokens, seq.block_table[: seq.num_cached // self.pool.block_size])
        if out.empty:
            return StepResult()
        masks = self._start_masks(out.sampled)
        try:
            logits, prompt_parts = self._forward(out)
            prompt_lps = self._prompt_logprobs(logits, prompt_parts)
            if prompt_parts:
                logits = logits[self._sample_rows(out, prompt_parts)]
        except Exception as e:  # noqa: BLE001 - a failed forward fails its batch, not the server
            log.exception("forward failed")
            if masks is not None:
                masks[2].exception()  # NOTE: the matchers are not touched again until it is done
            return StepResult(error=e)
        return StepResult(self._sample(out.sampled, logits, self._finish_masks(masks)), prompt_logprobs=prompt_lps)

    # ---- grammar masks -------------------------------------------------------------------------
    def _start_masks(self, rows: list[Sequence]) -> tuple[list[int], torch.Tensor, Future] | None:
        """Starts computing the token masks of the constrained rows on a helper thread, so that the
        CPU work overlaps the forward pass (llguidance runs without the GIL). A matcher's state only
        depends on tokens already sampled, so the mask for this step is known before its logits."""
        constrained = [(r, s.matcher) for r, s in enumerate(rows) if s.matcher is not None]
        if not constrained:
            return None
        if self._masker is None:
            self._masker = ThreadPoolExecutor(1, thread_name_prefix="mistralrs-grammar")
        bitmask = torch.empty((len(constrained), mask_words(self.vocab_size)), dtype=torch.int32)
        future = self._masker.submit(fill_masks, [m for _, m in constrained], bitmask)
        return [r for r, _ in constrained], bitmask, future

    def _finish_masks(self, masks) -> tuple[list[int], torch.Tensor] | None:
        """-> (the constrained rows, their masks [len(rows), W]) once computed."""
        if masks is None:
            return None
        rows, bitmask, future = masks
        future.result()
        return rows, bitmask

    def close(self) -> None:
        if self._masker is not None:
            self._masker.shutdown(wait=True)

    def _forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[tuple[Sequence, int, int, int]]]:
        """-> float32 logits of the step's sampled rows in order, plus, for a prompt whose logprobs
        are wanted, every row of its chunk; and those chunks as (sequence, start, n, first row)."""
        ids: list[int] = [s.tokens[-1] for s in out.decode]
        decode = [(s.slot, len(s.tokens) - 1) for s in out.decode]
        tables = {s.slot: s.block_table for s in out.decode}
        prefill, want, parts = [], [], []
        row = len(decode)
        for seq, start, n in out.prefill:
            ids.extend(seq.tokens[start : start + n])
            prefill.append((seq.slot, start, n))
            tables[seq.slot] = seq.block_table
            ends = start + n == len(seq.tokens)
            # NOTE: every row of a chunk that scores prompt tokens comes back; a chunk of a recompute
            # (preemption) whose positions are scored already is a plain chunk
            if seq.prompt_rows_to_score(start, n):
                want.append("all")
                parts.append((seq, start, n, row))
                row += n
            else:
                want.append(ends)
                row += int(ends)
        if self.graphs is not None and not prefill and self.graphs.fits(len(decode), max(p for _, p in decode) + 1):
            # NOTE: a decode-only step: static buffers, a graph
            return self.graphs.run(ids, decode, [s.block_table for s in out.decode]), []
        view = self.pool.build_view(decode, prefill, self.window, want, tables)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.pipe.device)
        return self.pipe.forward(input_ids, view, self.pool), parts

    # ---- prompt logprobs -----------------------------------------------------------------------
    def _sample_rows(self, out: SchedulerOutput, parts: list) -> torch.Tensor:
        """The rows of the logits that belong to out.sampled, when whole prompt chunks came back too."""
        rows = list(range(len(out.decode)))
        full = {id(seq): first + n - 1 for seq, _, n, first in parts}
        row = len(out.decode)
        for chunk in out.prefill:
            if id(chunk.seq) in full:
                if chunk.ends_prompt:
                    rows.append(full[id(chunk.seq)])
                row += chunk.n
            elif chunk.ends_prompt:
                rows.append(row)
                row += 1
        return torch.tensor(rows, dtype=torch.long, device=self.pipe.device)

    def _prompt_logprobs(self, logits: torch.Tensor, parts: list) -> list[tuple[Sequence, int, list[TokenLogprob]]]:
        """Each prompt token not scored yet: its logprob from the row before it (float32 log-softmax
        of the model's logits), with its `prompt_logprobs` best alternatives; one host read for the
        step."""
        if not parts:
            return []
        rows, targets, tops, owners, firsts = [], [], [], [], []
        for seq, start, n, first in parts:
            # NOTE: the row at position p predicts the token at p + 1 (Sequence.prompt_rows_to_score)
            todo = seq.prompt_rows_to_score(start, n)
            firsts.append(todo.start + 1)
            for p in todo:
                rows.append(first + p - start)
                targets.append(seq.tokens[p + 1])
                tops.append(seq.params.prompt_logprobs)
                owners.append(seq)
        dev = logits.device
        got = sampling.batch_token_logprobs(
            logits[torch.tensor(rows, device=dev)], torch.tensor(targets, device=dev), tops
        )
        by_seq: dict[int, list[TokenLogprob]] = {id(seq): [] for seq, *_ in parts}
        for seq, t, (lp, top) in zip(owners, targets, got):
            by_seq[id(seq)].append(TokenLogprob(t, lp, top))
        return [(seq, k, by_seq[id(seq)]) for (seq, *_), k in zip(parts, firsts)]

    # ---- sampling ------------------------------------------------------------------------------
    def _sample(
        self, rows: list[Sequence], logits: torch.Tensor, masks: tuple[list[int], torch.Tensor] | None
    ) -> list[Sample | Exception]:
        # NOTE: each constrained row's mask, for the row-by-row fallback
        row_masks = dict(zip(masks[0], masks[1])) if masks is not None else {}
        try:
            batch = self._sample_batch(rows, logits, masks)
        except Exception:  # noqa: BLE001 - one bad row must not fail the others: retry row by row
            log.warning("batched sampling failed; sampling this step row by row", exc_info=True)
            batch = [None] * len(rows)
        out: list[Sample | Exception] = []
        for r, seq in enumerate(rows):
            # NOTE: a row the batch could not sample (None) is sampled alone, where a bad setup
            # raises and fails this sequence only.
            try:
                out.append(batch[r] if batch[r] is not None else self._sample_row(seq, logits[r], row_masks.get(r)))
            except GrammarFailed as e:  # NOTE: the client's grammar met a limit: no server error to log
                out.append(e)
            except Exception as e:  # noqa: BLE001 - reported to this sequence alone
                log.exception("sampling failed")
                out.append(e)
        return out

    def _sample_batch(
        self, rows: list[Sequence], logits: torch.Tensor, masks: tuple[list[int], torch.Tensor] | None
    ) -> list[Sample | None]:
        """Samples every row of the step in one batched call (greedy without penalties is a plain
        argmax); None for a row whose distribution is empty or not finite, or whose grammar failed."""
        if not rows:
            return []
        logits = logits[: len(rows)]
        params = [s.params for s in rows]
        # NOTE: output ids are copied out only for rows with presence/frequency penalties.
        outputs = [s.output_ids if p.presence_penalty or p.frequency_penalty else [] for s, p in zip(rows, params)]
        # NOTE: the grammar's mask comes first, so that bias, penalties, temperature and top-k/p act
        # on the allowed tokens only (a top-k taken before it could keep none of them); logprobs
        # below still read the model's own distribution, `logits`.
        constrained = logits
        if masks is not None:
            idx = torch.tensor(masks[0], dtype=torch.long, device=logits.device)
            constrained = logits.float().index_copy(0, idx, sampling.apply_token_bitmask(logits[idx].float(), masks[1]))
        tokens = sampling.sample_batch(
            constrained, params, outputs, [s.tokens for s in rows], [s.generator for s in rows]
        )
        want = [r for r, p in enumerate(params) if p.logprobs]
        lps = {}
        if want:
            idx = torch.tensor(want, dtype=torch.long, device=logits.device)
            top_ns = [params[r].top_logprobs for r in want]
            got = sampling.batch_token_logprobs(logits[idx], tokens[idx].clamp(min=0), top_ns)
            lps = dict(zip(want, got))
        ids = tokens.tolist()  # NOTE: the step's one host read of the sampled tokens
        return [
            None
            if t < 0 or (s.matcher is not None and s.matcher.is_error())  # NOTE: argmax of all -inf is 0
            else (t, TokenLogprob(t, *lps[r]) if r in lps else None)
            for r, (t, s) in enumerate(zip(ids, rows))
        ]

    def _sample_row(self, seq: Sequence, row: torch.Tensor, mask: torch.Tensor | None) -> Sample:
        """One row alone: the fallback when the batch fails, so a bad row fails by itself."""
        p = seq.params
        if seq.matcher is not None and seq.matcher.is_error():
            raise GrammarFailed(grammar_failure(seq.matcher))
        logits = row if mask is None else sampling.apply_token_bitmask(row[None].float(), mask[None])[0]
        processed = sampling.process_logits(logits, p, seq.output_ids, seq.tokens)
        token = sampling.sample(processed, sampling.is_greedy(p), seq.generator)
        lp = None
        if p.logprobs:
            logprob, top = sampling.token_logprobs(row, token, p.top_logprobs)
            lp = TokenLogprob(token, logprob, top)
        return token, lp
