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
from .kv_cache import CacheShape, KVCachePool
from .request import Delta, Done, Error, Request, TokenLogprob
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SeqStatus

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
    def __init__(self, pipeline: Pipeline, *, max_seqs: int = 16, policy: str = "continuous", prefill_chunk: int = 512):
        self.pipe = pipeline
        c = pipeline.config
        self.max_len = pipeline.max_model_len
        self.pool = KVCachePool(CacheShape(c.num_layers, c.num_kv_heads, c.head_dim), max_seqs, self.max_len,
                                pipeline.dtype, pipeline.device, streams=pipeline.cache_streams)
        self.scheduler = Scheduler(max_seqs, policy, prefill_chunk)
        self.eos_ids = list(pipeline.tokenizer.eos_ids)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None

    # ---- thread-safe API ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mistralrs-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def add_request(self, request: Request) -> None:
        if self.dead is not None or self._stopping:
            raise EngineDead("the engine is not running")
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive()

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

    def _release(self, seq: Sequence) -> dict | None:
        self.scheduler.remove(seq)
        extra = None
        if seq.slot is not None:
            extra = self.pipe.release_slot(seq.slot)
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
        for seq in out.admitted:
            seq.slot = self.pool.allocate()
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
        view = self.pool.build_view([(s.slot, len(s.tokens) - 1) for s in out.decode], prefill,
                                    self.pipe.config.sliding_window, want)
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
        fast = all(not sampling.needs_processing(s.params) and not s.params.logprobs for s in rows)
        greedy_tokens = logits.argmax(-1).tolist() if fast else None  # NOTE: the step's one host sync
        for r, seq in enumerate(rows):
            try:
                if greedy_tokens is not None:
                    token, lp = greedy_tokens[r], None
                else:
                    token, lp = self._sample(seq, logits[r])
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

    def _sample(self, seq: Sequence, row: torch.Tensor) -> tuple[int, TokenLogprob | None]:
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
