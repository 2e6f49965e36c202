"""The engine: a worker thread that turns requests into tokens. `step()` = schedule -> execute -> update."""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass

import torch

from .. import sampling
from ..pipeline.base import Pipeline
from ..pipeline.tokenizer import IncrementalDetokenizer
from .graphs import DecodeGraphs
from .kv_cache import CacheShape, KVCachePool, plan_pool
from .request import Delta, Done, Error, Request, TokenLogprob
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SeqStatus
from .worker import TorchThread

log = logging.getLogger("mistralrs.engine")


class EngineDead(RuntimeError):
    pass


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    errors: int = 0
    preempted: int = 0


class Engine:
    def __init__(self, pipeline: Pipeline, *, max_seqs: int = 16, policy: str = "continuous", prefill_chunk: int = 512,
                 kv_cache_mb: float | None = None, cuda_graphs: bool = True, compile: bool = False,
                 worker: TorchThread | None = None):
        self.pipe = pipeline
        self.worker = worker  # the thread that loaded the model runs the loop too (see worker.py)
        c = pipeline.config
        shape = CacheShape(c.num_layers, c.num_kv_heads, c.head_dim)
        plan = plan_pool(shape, pipeline.dtype, pipeline.device, max_seqs, pipeline.max_model_len,
                         pipeline.cache_streams, kv_cache_mb)
        # NOTE: the served context never exceeds what the cache can hold, so one sequence alone
        # always fits and preemption can always make progress.
        self.max_len = min(pipeline.max_model_len, plan.slot_len, plan.capacity_tokens)
        if self.max_len < pipeline.max_model_len:
            log.warning("the KV cache holds %d tokens, so contexts are served up to %d tokens (the model's: %d); "
                        "raise --kv-cache-mb or lower --max-seqs for more", plan.capacity_tokens, self.max_len,
                        pipeline.max_model_len)
        cuda = pipeline.device.type == "cuda"
        # NOTE: decode-only steps run on static, bucketed buffers (engine/graphs.py) for CUDA graphs,
        # and for --compile: each batch bucket is one compiled graph (torch's int4 CPU kernel fixes
        # a graph's row count, so padding to 1/2/4/8/16 rows bounds how many graphs exist).
        graphs = pipeline.graphable and ((cuda_graphs and cuda) or compile)
        self.pool = KVCachePool(shape, plan.slots, plan.slot_len, pipeline.dtype, pipeline.device,
                                streams=pipeline.cache_streams, capacity_tokens=plan.capacity_tokens,
                                scratch_slot=graphs)
        self.graphs = DecodeGraphs(pipeline.forward, self.pool, plan.slots, c.sliding_window,
                                   capture=cuda and cuda_graphs) if graphs else None
        self.scheduler = Scheduler(plan.slots, policy, prefill_chunk, capacity_tokens=plan.capacity_tokens)
        if compile and self.graphs is not None:
            self._compile_decode()
        elif compile:
            log.warning("--compile is not available for this model kind (it keeps per-step state); decoding eagerly")
        self.eos_ids = list(pipeline.tokenizer.eos_ids)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop_done = threading.Event()
        self.dead: BaseException | None = None

    def _compile_decode(self) -> None:
        """--compile: builds a compiled decode graph for every batch bucket now (about a minute each on
        a small CPU, seconds once torch's on-disk cache holds them), not during the first requests."""
        try:
            self.pipe.compile_decode()
            scratch = self.pool.scratch_slot
            for b in self.graphs.buckets:
                self.graphs.run([0] * b, [(scratch, 0)] * b)  # NOTE: every row writes the scratch slot
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op...: serve eagerly
            log.warning("--compile failed (%s: %s); decoding eagerly", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.pipe.compiled_decode = None
            if not self.graphs.capture:
                self.graphs = None  # NOTE: plain steps then (slice views, no padding)

    # ---- thread-safe API ------------------------------------------------------------------------
    def start(self) -> None:
        if self.worker is not None:
            self._thread = self.worker.thread
            self.worker.start(self._run)
        else:
            self._thread = threading.Thread(target=self._run, name="mistralrs-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._loop_done.wait(timeout)

    def add_request(self, request: Request) -> None:
        if self.dead is not None or self._stopping:
            raise EngineDead("the engine is not running")
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    @property
    def alive(self) -> bool:
        return (self.dead is None and self._thread is not None and self._thread.is_alive()
                and not self._loop_done.is_set())

    def snapshot(self) -> dict:
        """Counts for /health and tests (read without locks: approximate while running)."""
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_slots_in_use": self.pool.num_used,
            "kv_cache_bytes_in_use": self.pool.bytes_in_use(sum(s.num_cached for s in list(self.scheduler.running))),
            **self.stats.__dict__,
        }

    # ---- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._drain(block=not self.scheduler.has_work):
                    break
                self.step()
        except BaseException as e:  # noqa: BLE001 - the thread must report, not vanish
            log.exception("engine thread died")
            self.dead = e
            self._fail_all(f"the engine stopped: {type(e).__name__}")
        finally:
            self._fail_all("the server is shutting down", drain=True)
            self._loop_done.set()

    def _drain(self, block: bool) -> bool:
        """Applies queued adds and aborts; returns False when asked to stop."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return not self._stopping
        while True:
            kind, payload = item
            if kind == "stop":
                return False
            if kind == "add":
                self._admit(payload)
            elif kind == "abort":
                self._abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _admit(self, req: Request) -> None:
        first = None
        for i in range(req.params.n):
            gen = torch.Generator(device=self.pipe.device)
            seed = req.params.seed
            gen.manual_seed(seed + i if seed is not None else random.getrandbits(63))
            detok = IncrementalDetokenizer(self.pipe.tokenizer, req.prompt_ids, req.params.skip_special_tokens)
            seq = Sequence(req, i, detok, gen)
            if first is None:
                first = seq
            elif self.pipe.shares_prefixes:
                seq.share_from = first  # NOTE: the prompt is processed once for all n choices
            self.scheduler.add(seq)

    def _abort(self, request_id: str) -> None:
        for seq in self.scheduler.sequences_of(request_id):
            seq.finish("abort")
            self._release(seq)
            self.stats.aborted += 1

    def _release(self, seq: Sequence, preempted: bool = False) -> dict | None:
        """Frees the sequence's cache slot; unless it was preempted, it also leaves the scheduler."""
        if not preempted:
            self.scheduler.remove(seq)
        extra = None
        if seq.slot is not None:
            extra = self.pipe.end_slot(seq.slot)
            self.pool.free(seq.slot)
            seq.slot = None
        return extra

    def _fail_all(self, message: str, drain: bool = False) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            seq.request.emit(Error(message, "server_error", seq.index))
            seq.finish("error")
            self._release(seq)
        if drain:
            while True:
                try:
                    kind, payload = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    payload.emit(Error(message, "server_error"))

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> None:
        out = self.scheduler.schedule(self.pool.num_free)
        for seq in out.preempted:
            self._release(seq, preempted=True)
            self.stats.preempted += 1
        for seq in out.admitted:
            seq.slot = self.pool.allocate()
            self.pipe.begin_slot(seq.slot)
        for src, dst, n in out.copies:
            self.pool.copy_prefix(src.slot, dst.slot, n)
        if out.empty:
            return
        try:
            logits = self._execute(out)
        except Exception as e:  # noqa: BLE001 - a failed forward fails its batch, not the server
            log.exception("forward failed")
            for seq in [*out.decode, *(s for s, _ in out.prefill)]:
                self.stats.errors += 1
                seq.request.emit(Error(f"model forward failed: {type(e).__name__}", "server_error", seq.index))
                seq.finish("error")
                self._release(seq)
            return
        self._update(out, logits)
        self.stats.steps += 1

    def _execute(self, out: SchedulerOutput) -> torch.Tensor:
        ids: list[int] = [s.tokens[-1] for s in out.decode]
        prefill, want = [], []
        for seq, n in out.prefill:
            ids.extend(seq.tokens[seq.num_cached : seq.num_cached + n])
            prefill.append((seq.slot, seq.num_cached, n))
            want.append(seq.num_cached + n == len(seq.tokens))
        decode = [(s.slot, len(s.tokens) - 1) for s in out.decode]
        if self.graphs is not None and not prefill and self.graphs.fits(len(decode), max(p for _, p in decode) + 1):
            logits = self.graphs.run(ids, decode)  # NOTE: a decode-only step: static buffers, a graph
        else:
            view = self.pool.build_view(decode, prefill, self.pipe.config.sliding_window, want)
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.pipe.device)
            logits = self.pipe.forward(input_ids, view, self.pool)  # [rows, V] float32
        for seq in out.decode:
            seq.num_cached += 1
        for seq, n in out.prefill:
            seq.num_cached += n
            self.stats.prompt_tokens += n
        return logits

    def _update(self, out: SchedulerOutput, logits: torch.Tensor) -> None:
        rows = [*out.decode, *(s for s, _ in out.prefill if s.num_cached == len(s.tokens))]
        try:
            batch = self._sample_batch(rows, logits)
        except Exception:  # noqa: BLE001 - one bad row must not fail the others: retry row by row
            log.warning("batched sampling failed; sampling this step row by row", exc_info=True)
            batch = [None] * len(rows)
        for r, seq in enumerate(rows):
            try:
                # NOTE: a row the batch could not sample (None) is sampled alone, where a bad
                # setup raises and fails this sequence only.
                token, lp = batch[r] if batch[r] is not None else self._sample(seq, logits[r])
            except Exception as e:  # noqa: BLE001 - a bad sampling setup fails this sequence alone
                log.exception("sampling failed")
                self.stats.errors += 1
                seq.request.emit(Error(f"sampling failed: {type(e).__name__}: {e}", "server_error", seq.index))
                seq.finish("error")
                self._release(seq)
                continue
            seq.append(token, self.max_len, self.eos_ids)
            if lp is not None:
                seq.pending_logprobs.append(lp)
            self.stats.generated_tokens += 1
            self._emit(seq)

    def _sample_batch(self, rows: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None] | None]:
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

    def _sample(self, seq: Sequence, row: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """One row alone: the fallback when the batch fails, so a bad row fails by itself."""
        p = seq.params
        processed = sampling.process_logits(row, p, seq.output_ids, seq.tokens)
        token = sampling.sample(processed, sampling.is_greedy(p), seq.generator)
        lp = None
        if p.logprobs:
            logprob, top = sampling.token_logprobs(row, token, p.top_logprobs)
            lp = TokenLogprob(token, logprob, top)
        return token, lp

    def _emit(self, seq: Sequence) -> None:
        text = seq.take_delta()
        finished = seq.status is SeqStatus.FINISHED
        if text or finished:
            # NOTE: token ids and logprobs travel with the text they produced; a token whose text is
            # held back (incomplete character, possible stop string) waits for the next delta.
            seq.request.emit(Delta(seq.index, text, seq.pending_ids, seq.pending_logprobs or None))
            seq.pending_ids, seq.pending_logprobs = [], []
        if finished:
            self.stats.finished += 1
            extra = self._release(seq)
            seq.request.emit(Done(seq.index, seq.finish_reason or "stop", seq.prompt_len, seq.num_output, seq.stop_reason, extra))
