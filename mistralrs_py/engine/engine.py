"""The engine: a loop on the torch thread that turns requests into tokens. `step()` = schedule ->
execute -> update: the scheduler decides (engine/scheduler.py), the model runner computes
(engine/model_runner.py), and the update step appends tokens, checks stops and emits events."""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass

import torch

from ..pipeline.base import Pipeline
from ..pipeline.tokenizer import IncrementalDetokenizer
from .grammar import GRAMMAR_LIMIT, GrammarFailed, grammar_failure
from .graphs import DecodeGraphs
from .kv_cache import DEFAULT_BLOCK_SIZE, CacheShape, KVCachePool, plan_pool
from .model_runner import ModelRunner, StepResult
from .request import Delta, Done, Error, Request
from .scheduler import Scheduler, SchedulerOutput
from .sequence import SeqStatus, Sequence
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


class Engine:
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_seqs: int = 16,
        policy: str = "continuous",
        prefill_chunk: int = 512,
        kv_cache_mb: float | None = None,
        cuda_graphs: bool = True,
        compile: bool = False,
        prefix_caching: bool = True,
        block_size: int = DEFAULT_BLOCK_SIZE,
        worker: TorchThread | None = None,
    ):
        self.pipe = pipeline
        self.worker = worker  # the thread that loaded the model runs the loop too (see worker.py)
        c = pipeline.config
        m = pipeline.held_config  # NOTE: the heads this process holds (all of them unless tensor parallel)
        shape = CacheShape(m.num_layers, m.num_kv_heads, m.head_dim)
        plan = plan_pool(
            shape,
            pipeline.dtype,
            pipeline.device,
            max_seqs,
            pipeline.max_model_len,
            pipeline.cache_streams,
            kv_cache_mb,
            block_size,
            pipeline.summary.get("weights_bytes", 0),
        )
        # NOTE: the served context never exceeds what the cache can hold, so one sequence alone
        # always fits and preemption can always make progress.
        self.max_len = min(pipeline.max_model_len, plan.capacity_tokens)
        if self.max_len < pipeline.max_model_len:
            log.warning(
                "the KV cache holds %d tokens, so contexts are served up to %d tokens (the model's: %d); "
                "raise --kv-cache-mb for more",
                plan.capacity_tokens,
                self.max_len,
                pipeline.max_model_len,
            )
        cuda = pipeline.device.type == "cuda"
        # NOTE: decode-only steps run on static, bucketed buffers (engine/graphs.py) for CUDA graphs,
        # and for --compile: each batch bucket is one compiled graph (torch's int4 CPU kernel fixes
        # a graph's row count, so padding to 1/2/4/8/16 rows bounds how many graphs exist).
        static = pipeline.graphable and ((cuda_graphs and cuda) or compile)
        self.pool = (pipeline.pool_type or KVCachePool)(
            shape,
            plan.num_blocks,
            plan.block_size,
            pipeline.dtype,
            pipeline.device,
            streams=pipeline.cache_streams,
            num_slots=max_seqs,
        )
        graphs = (
            DecodeGraphs(
                pipeline.forward, self.pool, max_seqs, self.max_len, c.sliding_window, capture=cuda and cuda_graphs
            )
            if static
            else None
        )
        # NOTE: freed blocks stay cached for later prompts. On a GPU the pool is allocated anyway;
        # on the CPU each cached block is resident memory, so without --kv-cache-mb (whose budget
        # the user chose) the plan bounds how many stay cached once freed.
        retain = plan.retain_blocks
        self.scheduler = Scheduler(
            max_seqs,
            policy,
            prefill_chunk,
            num_blocks=plan.num_blocks,
            block_size=plan.block_size,
            prefix_caching=prefix_caching,
            retain_blocks=retain,
            cache_decoded=pipeline.caches_decoded_blocks,
        )
        self.runner = ModelRunner(pipeline, self.pool, graphs)
        if compile and graphs is not None:
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
        graphs = self.runner.graphs
        try:
            self.pipe.compile_decode()
            scratch = self.pool.scratch_block
            for b in graphs.buckets:
                graphs.run([0] * b, [(0, 0)] * b, [[scratch]] * b)  # NOTE: every row writes the scratch block
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op...: serve eagerly
            log.debug("--compile failed", exc_info=True)
            log.warning(
                "--compile failed (%s: %s); decoding eagerly",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            self.pipe.compiled_decode = None
            if not graphs.capture:
                self.runner.graphs = None  # NOTE: plain steps then (slice views, no padding)

    # ---- thread-safe API ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
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

    def fail(self, reason: str) -> None:
        """Something the engine depends on failed for good (a tensor-parallel rank): it is dead from
        now on (`alive` is False), and its loop stops as soon as it can."""
        if self.dead is None:
            self.dead = RuntimeError(reason)
        self._stopping = True
        self._inbox.put(("stop", None))

    def add_request(self, request: Request) -> None:
        if self.dead is not None or self._stopping:
            raise EngineDead("the engine is not running")
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    @property
    def alive(self) -> bool:
        return (
            self.dead is None and self._thread is not None and self._thread.is_alive() and not self._loop_done.is_set()
        )

    def snapshot(self) -> dict:
        """Counts for /health and tests (read without locks: approximate while running)."""
        cache = self.scheduler.cache
        used, cached = cache.num_used, cache.num_cached_free
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "max_seqs": self.scheduler.max_seqs,
            "kv_block_size": cache.block_size,
            "kv_blocks_total": cache.num_blocks,
            "kv_blocks_in_use": used,  # NOTE: held by running sequences (a shared block once)
            "kv_blocks_cached": cached,  # free, but holding a cached prefix
            "kv_blocks_free": cache.num_free - cached,
            "kv_cache_bytes_in_use": self.pool.bytes_in_use(used),
            "kv_cache_bytes_cached": self.pool.bytes_in_use(cached),
            "kv_cache_capacity_tokens": cache.num_blocks * cache.block_size,
            "kv_cache_capacity_bytes": self.pool.bytes_in_use(cache.num_blocks),
            "prefix_cache_capacity_bytes": self.pool.bytes_in_use(min(cache.retain_blocks, cache.num_blocks)),
            "prefix_cache": cache.prefix_caching,
            "prefix_cache_queries": cache.stats.queries,
            "prefix_cache_hits": cache.stats.hits,
            "preempted": self.scheduler.num_preemptions,
            **self.stats.__dict__,
        }

    def run_until_idle(self) -> None:
        """Does the loop's work on the calling thread until no request is left: for an engine driven
        without its thread (benchmarks that keep all torch work on one thread)."""
        while self._drain(block=False) and self.scheduler.has_work:
            self.step()

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
            self.runner.close()
            try:
                self.pipe.close()
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("closing the pipeline failed")
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
                self._add(payload)
            elif kind == "abort":
                for seq in self.scheduler.sequences_of(payload):
                    self._end(seq, "abort")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, req: Request) -> None:
        """Creates the request's sequences; anything their set-up raises fails this request alone."""
        try:
            seqs = self._sequences(req)
        except Exception as e:  # noqa: BLE001 - one request's bad set-up must not stop the engine
            log.exception("request %s could not be set up", req.id)
            self.stats.errors += 1
            req.emit(Error(f"the request could not be set up: {type(e).__name__}: {e}", "server_error"))
            return
        for seq in seqs:
            self.scheduler.add(seq)

    def _sequences(self, req: Request) -> list[Sequence]:
        n = len(req.prompt_ids)
        # NOTE: a sequence with no token can never make progress (nothing to compute logits from),
        # and one that fills the context cannot take a token; the OpenAI layer refuses both with a
        # 400, this keeps any other caller from parking one in the scheduler forever.
        if not 0 < n < self.max_len:
            raise ValueError(f"a prompt must have 1 to {self.max_len - 1} tokens, this one has {n}")
        seqs: list[Sequence] = []
        for i in range(req.params.n):
            gen = torch.Generator(device=self.pipe.device)
            seed = req.params.seed
            # NOTE: torch takes seeds in [0, 2**64): wrap, so that seed + i never overflows
            gen.manual_seed((seed + i) % 2**64 if seed is not None else random.getrandbits(63))
            detok = IncrementalDetokenizer(self.pipe.tokenizer, req.prompt_ids, req.params.skip_special_tokens)
            seq = Sequence(req, i, detok, gen)
            if seqs:
                seq.share_from = seqs[0]  # NOTE: the prompt's blocks are computed once for all n choices
            seqs.append(seq)
        return seqs

    def _end(
        self, seq: Sequence, reason: str, message: str = "", computed: bool = True, code: str = "server_error"
    ) -> dict | None:
        """Ends a sequence that did not finish by itself (abort, error) or did (stop, length):
        it leaves the scheduler, its blocks are released (those computed stay in the prefix cache
        unless its last step failed: `computed`); returns its pipeline report."""
        if reason == "error":
            self.stats.errors += 1
            seq.request.emit(Error(message, code, seq.index))
        elif reason == "abort":
            self.stats.aborted += 1
        if not seq.status.is_finished:
            seq.finish(reason)
        slot = self.scheduler.drop(seq, computed)
        self.runner.release_blocks(self.scheduler.cache.take_released())
        return self.runner.release(slot) if slot is not None else None

    def _fail_all(self, message: str, drain: bool = False) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            self._end(seq, "error", message, computed=False)
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
        out = self.scheduler.schedule()
        result = self.runner.execute(out)
        self._update(out, result)

    def _update(self, out: SchedulerOutput, result: StepResult) -> None:
        """Appends the sampled tokens, checks stops, emits text; ends what finished or failed."""
        if result.error is not None:
            message = f"model forward failed: {type(result.error).__name__}"
            for seq in {id(s): s for s in (*out.decode, *(c.seq for c in out.prefill))}.values():
                self._end(seq, "error", message, computed=False)
            return
        if out.empty:
            return
        self.stats.steps += 1
        self.stats.prompt_tokens += sum(c.n for c in out.prefill)
        for seq, first, lps in result.prompt_logprobs:
            seq.add_prompt_logprobs(first, lps)
        for seq, sample in zip(out.sampled, result.samples):
            if isinstance(sample, GrammarFailed):
                self._end(seq, "error", str(sample), code=GRAMMAR_LIMIT)
                continue
            if isinstance(sample, Exception):
                self._end(seq, "error", f"sampling failed: {type(sample).__name__}: {sample}")
                continue
            if seq.params.max_tokens == 0:
                # NOTE: the prompt alone (echo, prompt logprobs): prefilled, nothing generated
                seq.finish("length")
                self._emit(seq)
                continue
            token, lp = sample
            # NOTE: the grammar advances with every sampled token; its mask allowed only tokens it
            # accepts, so a refusal here means the matcher failed (a resource limit)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                self._end(seq, "error", grammar_failure(seq.matcher), code=GRAMMAR_LIMIT)
                continue
            seq.append(token, self.max_len, self.eos_ids)
            if lp is not None:
                seq.pending_logprobs.append(lp)
            self.stats.generated_tokens += 1
            self._emit(seq)

    def _emit(self, seq: Sequence) -> None:
        text = seq.take_delta()
        finished = seq.status is SeqStatus.FINISHED
        if text or finished:
            # NOTE: token ids and logprobs travel with the text they produced; a token whose text is
            # held back (incomplete character, possible stop string) waits for the next delta.
            seq.request.emit(
                Delta(seq.index, text, seq.pending_ids, seq.pending_logprobs or None, seq.take_prompt_logprobs())
            )
            seq.pending_ids, seq.pending_logprobs = [], []
        if finished:
            self.stats.finished += 1
            extra = self._end(seq, seq.finish_reason or "stop")
            seq.request.emit(
                Done(
                    seq.index,
                    seq.finish_reason or "stop",
                    seq.prompt_len,
                    seq.num_output,
                    seq.stop_reason,
                    extra,
                    seq.cached_prompt_tokens or 0,
                )
            )
