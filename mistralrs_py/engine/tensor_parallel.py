"""Tensor parallelism's processes: one model across `world` ranks on torch.distributed (gloo on the
CPU, NCCL on GPUs), each holding its share of every layer (models/tensor_parallel.py).

Rank 0 runs the scheduler, the engine and the HTTP server; the other ranks only run the model. Each
step, rank 0 sends one message (through shared memory where every rank runs on this machine's CPUs,
engine/shm_comm.py, else a gloo broadcast): the cache operations since the last step (pool set-up,
blocks zeroed or released, the batch view's arguments) and the step's token ids;
every rank then builds the same batch view on its own KV cache (its heads only, the same block
tables) and runs its part of the forward pass; the logits are gathered (models/tensor_parallel.py)
and rank 0 samples.

Two ways to start:
  * `--tensor-parallel-size N` alone: rank 0 (this process) starts N - 1 worker processes on this
    machine (multiprocessing, spawn) and hosts the rendezvous store on a free local port.
  * under torchrun (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set): every rank runs the same command
    line; rank 0 serves, the others become workers. This is how ranks span machines.

Failures are loud: every worker beats on the store once a second; rank 0 watches the beats (and the
exit of the processes it started), and a rank that stops, or a forward pass that fails part-way
through the collectives, fails the group: the engine is marked dead (`/health` answers 503) and the
server exits non-zero (server/launch.py). A worker whose rank 0 is gone exits too.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

import torch

from ..pipeline.base import LoadError, ModelSpec, Pipeline, load_pipeline, resolve_device
from .kv_cache import CacheShape, KVCachePool

log = logging.getLogger("mistralrs.tp")

BEAT_SECONDS = 1.0
# NOTE: a rank whose beats stop for this long is dead (a killed process's is noticed at once through
# its exit; beats cover ranks on other machines and hung processes)
BEAT_TIMEOUT = 8.0
# NOTE: collectives wait as long as rank 0 stays idle (a worker waits for the next step inside a
# broadcast), so the group's timeout is effectively none; dead peers are found by the watch above
# and by their closed connections
_FOREVER = timedelta(days=365)
_PREFIX = "mistralrs/"


@dataclass(frozen=True)
class Launch:
    """How this process joins the group."""

    rank: int
    world: int
    addr: str
    port: int
    local_rank: int = 0
    torchrun: bool = False  # the store is torchrun's (env://), not ours


def from_torchrun() -> Optional[Launch]:
    """The launch torchrun describes in the environment, or None when not under torchrun."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
        return None
    return Launch(
        rank=int(env["RANK"]),
        world=int(env["WORLD_SIZE"]),
        addr=env["MASTER_ADDR"],
        port=int(env.get("MASTER_PORT", "29500")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        torchrun=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(spec: ModelSpec, launch: Launch) -> str:
    """Each rank on its own GPU (cuda:LOCAL_RANK) when the spec asks for CUDA or finds it."""
    dev = resolve_device(spec.device)
    if dev.type != "cuda":
        return "cpu"
    per_node = torch.cuda.device_count()
    if launch.local_rank >= per_node:
        raise LoadError(
            f"tensor parallelism: local rank {launch.local_rank} has no GPU (this machine has {per_node}); "
            "run at most one rank per GPU, or --device cpu"
        )
    torch.cuda.set_device(launch.local_rank)
    return f"cuda:{launch.local_rank}"


def _join(launch: Launch, device: str, procs: Optional[list] = None):
    """init_process_group for this rank -> (the CPU group that carries rank 0's step messages, the
    shared-memory collectives when every rank runs on this machine's CPUs, else None). `procs`: the
    workers rank 0 started, watched while they join (one that dies first fails the start at once
    rather than after the store's timeout)."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if launch.torchrun:
        dist.init_process_group(backend, init_method="env://", timeout=_FOREVER)
    else:
        store = dist.TCPStore(
            launch.addr,
            launch.port,
            launch.world,
            launch.rank == 0,
            timeout=timedelta(seconds=120),
            wait_for_workers=False,
        )
        if launch.rank:
            store.set(f"{_PREFIX}joined/{launch.rank}", "1")
        else:
            _wait_joined(store, launch.world, procs or [])
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world, timeout=_FOREVER)
    # NOTE: step messages are pickled Python objects: on NCCL they travel on a gloo group of their own
    channel = dist.new_group(backend="gloo", timeout=_FOREVER) if backend == "nccl" else dist.group.WORLD
    comm = None
    if (
        backend == "gloo"
        and local_world(launch.world) == launch.world
        and os.environ.get("MISTRALRS_TP_SHM", "1") != "0"
    ):
        from .shm_comm import connect

        comm = connect(launch.rank, launch.world, _store(launch), channel)
    return channel, comm


def _wait_joined(store, world: int, procs: list, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for rank in range(1, world):
        while not store.check([f"{_PREFIX}joined/{rank}"]):
            for r, p in enumerate(procs, start=1):
                if p.exitcode is not None:
                    raise LoadError(
                        f"tensor parallelism: rank {r} exited with code {p.exitcode} while starting (its output is above)"
                    )
            if time.monotonic() > deadline:
                raise LoadError(f"tensor parallelism: rank {rank} did not start within {timeout:.0f} s")
            time.sleep(0.02)


def _store(launch: Launch):
    """A client of the rendezvous store of its own (store clients are not shared across threads)."""
    import torch.distributed as dist

    return dist.PrefixStore(
        _PREFIX, dist.TCPStore(launch.addr, launch.port, is_master=False, timeout=timedelta(seconds=30))
    )


def default_threads(world_on_this_machine: int) -> int:
    """The cores shared out among the ranks on one machine."""
    return max(1, (os.cpu_count() or 1) // world_on_this_machine)


# ---- rank 0 --------------------------------------------------------------------------------------------
class Group:
    """Rank 0's view of the group: the workers it started, their beats, and whether it has failed."""

    def __init__(self, launch: Launch, procs: list):
        self.launch, self.procs = launch, procs
        self.channel = None  # the CPU group of the step messages
        self.comm = None  # shared-memory collectives (engine/shm_comm.py), where all ranks are local
        self.failure: Optional[str] = None
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def on_failure(self, fn: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(fn)
            failure = self.failure
        if failure is not None:
            fn(failure)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None or self._stopped.is_set():
                return
            self.failure = reason
            listeners = list(self._listeners)
        log.error("tensor parallelism: %s", reason)
        for fn in listeners:
            try:
                fn(reason)
            except Exception:  # noqa: BLE001 - every listener hears it
                log.exception("a failure listener failed")

    def _dead_proc(self) -> Optional[str]:
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                return f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def wait_for_exit(self, timeout: float) -> Optional[str]:
        """Which started worker has exited, waiting up to `timeout` seconds for one to (None: none did)."""
        deadline = time.monotonic() + timeout
        while True:
            dead = self._dead_proc()
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 3600.0) -> None:
        """Until every worker has loaded its share; a worker's load error is raised here."""
        store = _store(self.launch)
        deadline = time.monotonic() + timeout
        pending = set(range(1, self.launch.world))
        while pending:
            for r in sorted(pending):
                if store.check([f"error/{r}"]):
                    raise LoadError(f"tensor parallelism: rank {r}: {store.get(f'error/{r}').decode()}")
                if store.check([f"ready/{r}"]):
                    pending.discard(r)
            dead = self._dead_proc()
            if dead and pending:
                raise LoadError(f"tensor parallelism: {dead} while loading")
            if time.monotonic() > deadline:
                raise LoadError(f"tensor parallelism: ranks {sorted(pending)} did not load within {timeout:.0f} s")
            time.sleep(0.05)

    def watch(self) -> None:
        """Starts the thread that fails the group when a worker stops (exit or silence)."""
        threading.Thread(target=self._watch, name="mistralrs-tp-watch", daemon=True).start()

    def _watch(self) -> None:
        store = _store(self.launch)
        last: dict[int, tuple[int, float]] = {}
        while not self._stopped.wait(0.25):
            try:
                store.add("beat/0", 1)  # NOTE: the workers watch rank 0 the same way
            except Exception:  # noqa: BLE001 - reported below
                pass
            dead = self._dead_proc()
            if dead:
                self.fail(dead)
                return
            now = time.monotonic()
            try:
                for r in range(1, self.launch.world):
                    beats = store.add(f"beat/{r}", 0)
                    if r not in last or beats != last[r][0]:
                        last[r] = (beats, now)
                    elif now - last[r][1] > BEAT_TIMEOUT:
                        self.fail(f"rank {r} stopped answering (no heartbeat for {BEAT_TIMEOUT:.0f} s)")
                        return
            except Exception as e:  # noqa: BLE001 - the store itself is gone
                self.fail(f"the rendezvous store failed ({type(e).__name__}: {e})")
                return

    def stop(self) -> None:
        """Ends the workers (their loop reads the stop message; those that do not are terminated)."""
        self._stopped.set()
        for p in self.procs:
            p.join(timeout=5)
            if p.exitcode is None:
                p.terminate()


class ParallelPool(KVCachePool):
    """Rank 0's KV cache: the cache operations are recorded and sent with the next step, so that every
    rank's cache (its own heads) is set up, zeroed, released and viewed the same way."""

    _ids = iter(range(1 << 62))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_id = next(ParallelPool._ids)
        self._announced = False
        self._ops: list[tuple] = []

    def _announce(self) -> None:
        if not self._announced:
            # NOTE: sent at the first step, after for_pipeline has set the slot tables
            unzeroed = sorted(self._unzeroed)
            setup = (self.num_blocks, self.block_size, len(self.streams), self.num_slots, self._slot_blocks, unzeroed)
            self._ops.insert(0, ("pool", self.pool_id, setup))
            self._announced = True

    def zero_blocks(self, blocks) -> None:
        blocks = list(blocks)
        if blocks:
            self._ops.append(("zero", self.pool_id, blocks))
        super().zero_blocks(blocks)

    def release_blocks(self, blocks) -> None:
        blocks = list(blocks)
        if blocks:
            self._ops.append(("release", self.pool_id, blocks))
        super().release_blocks(blocks)

    def build_view(self, decode, prefill, window, want_prefill_logits, tables=None):
        self._ops.append(("view", self.pool_id, (decode, prefill, window, want_prefill_logits, tables)))
        return super().build_view(decode, prefill, window, want_prefill_logits, tables)

    def take_ops(self) -> list[tuple]:
        self._announce()
        ops, self._ops = self._ops, []
        return ops


@dataclass
class ParallelPipeline(Pipeline):
    """Rank 0's pipeline: its forward sends the step to the other ranks, then runs its own share."""

    group: Optional[Group] = field(default=None, repr=False)
    pool_type: Optional[type] = ParallelPool

    @torch.inference_mode()
    def forward(self, input_ids, view, cache) -> torch.Tensor:
        import torch.distributed as dist

        group = self.group
        if group.failure is not None:
            raise RuntimeError(f"tensor parallelism failed: {group.failure}")
        message = [*cache.take_ops(), ("forward", cache.pool_id, input_ids.tolist())]
        try:
            if group.comm is None or not group.comm.send(message):
                dist.broadcast_object_list([message], src=0, group=group.channel)
            return self.model(input_ids, view, cache)
        except Exception as e:
            # NOTE: the ranks are out of step once a collective failed part-way: the group is done.
            # A worker that died is the usual cause: its exit names it better than gloo's message.
            log.error("a tensor-parallel step failed", exc_info=True)
            group.fail(group.wait_for_exit(1.0) or f"a step failed on rank 0 ({type(e).__name__})")
            raise

    def close(self) -> None:
        import torch.distributed as dist

        group = self.group
        if group is None or group._stopped.is_set():
            return
        if group.failure is None:
            try:
                if group.comm is None or not group.comm.send([("stop",)]):
                    dist.broadcast_object_list([[("stop",)]], src=0, group=group.channel)
            except Exception:  # noqa: BLE001 - the workers are ended below anyway
                log.debug("could not send stop", exc_info=True)
        group.stop()
        if group.failure is None:
            dist.destroy_process_group()  # NOTE: this process may start another group later (tests, Runner)


def start(spec: ModelSpec, progress=None, threads: Optional[int] = None) -> ParallelPipeline:
    """Rank 0: starts the workers (or joins torchrun's), loads its share, waits for theirs. Runs on the
    engine's torch thread: every collective of rank 0 is issued from it."""
    launch = from_torchrun()
    if launch is not None:
        if launch.world != spec.tp_size:
            raise LoadError(
                f"--tensor-parallel-size {spec.tp_size} does not match torchrun's world size {launch.world}"
            )
        if launch.rank != 0:
            raise LoadError("tensor parallelism: only rank 0 serves; this process should have run as a worker")
        procs = []
    else:
        launch = Launch(0, spec.tp_size, "127.0.0.1", _free_port())
        gpus = torch.cuda.device_count() if resolve_device(spec.device).type == "cuda" else None
        if gpus is not None and gpus < launch.world:
            raise LoadError(
                f"--tensor-parallel-size {launch.world} on CUDA runs one process per GPU, and this machine has "
                f"{gpus}; use at most {gpus}, or --device cpu"
            )
        procs = _spawn_workers(launch, spec, threads)
    group = Group(launch, procs)
    try:
        device = _device_for(spec, launch)
        group.channel, group.comm = _join(launch, device, procs)
        pipe = load_pipeline(dataclasses.replace(spec, tp_rank=0, device=device), progress)
        _use_comm(pipe, group.comm)
        if group.comm is not None:
            group.comm.failed = lambda: group.failure  # NOTE: a wait for a dead rank gives up
        group.wait_ready()
    except BaseException:
        import torch.distributed as dist

        for p in procs:
            p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()  # NOTE: this process may try again (Runner, tests)
        raise
    fields = {f.name: getattr(pipe, f.name) for f in dataclasses.fields(Pipeline) if f.name != "pool_type"}
    parallel = ParallelPipeline(**fields, group=group)
    parallel.graphable = False  # NOTE: steps run eagerly: collectives inside captured graphs are not supported here
    how = "nccl" if device != "cpu" else ("shared memory, gloo" if group.comm is not None else "gloo")
    parallel.summary["tensor_parallel"] = f"tensor parallel x{launch.world} ({how})"
    group.watch()
    return parallel


def _spawn_workers(launch: Launch, spec: ModelSpec, threads: Optional[int]) -> list:
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(1, launch.world):
        worker = dataclasses.replace(launch, rank=rank, local_rank=rank)
        p = ctx.Process(
            target=run_worker,
            args=(worker, spec, threads),
            name=f"mistralrs-tp-{rank}",
            daemon=True,
        )
        p.start()
        log.info("tensor parallelism: rank %d of %d is process %d", rank, launch.world, p.pid)
        procs.append(p)
    return procs


# ---- the other ranks -----------------------------------------------------------------------------------
def run_worker(launch: Launch, spec: ModelSpec, threads: Optional[int] = None) -> None:
    """A worker's whole life: join, load this rank's share, then run every step rank 0 sends until it
    says stop (exit 0) or goes away (exit 1). A load error is reported to rank 0 through the store."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {launch.rank}] %(message)s")
    torch.set_num_threads(threads or default_threads(local_world(launch.world)))
    try:
        device = _device_for(spec, launch)
        channel, comm = _join(launch, device)
    except Exception as e:  # noqa: BLE001 - nothing to report to without the group
        log.error("could not join the group: %s: %s", type(e).__name__, e)
        os._exit(1)
    store = _store(launch)
    threading.Thread(target=_beat, args=(launch,), name="mistralrs-tp-beat", daemon=True).start()
    try:
        pipe = load_pipeline(dataclasses.replace(spec, tp_rank=launch.rank, device=device))
        _use_comm(pipe, comm)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which fails the start with it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        store.set(f"error/{launch.rank}", f"{type(e).__name__}: {first}" if not isinstance(e, LoadError) else first)
        os._exit(1)
    store.set(f"ready/{launch.rank}", "1")
    try:
        _serve_steps(pipe, channel, comm)
    except Exception:  # noqa: BLE001 - rank 0 is gone or a step failed: this rank cannot go on
        log.exception("worker stopped")
        os._exit(1)
    os._exit(0)


def local_world(world: int) -> int:
    """The ranks on this machine: torchrun says; else all of them (rank 0 started them here)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def _beat(launch: Launch) -> None:
    """Once a second, tells rank 0 this rank lives; exits the process when rank 0's store is gone or
    rank 0, once it has started beating, stops (its beats: Group._watch)."""
    try:
        store = _store(launch)
        seen, since = 0, time.monotonic()
        while True:
            store.add(f"beat/{launch.rank}", 1)
            beats, now = store.add("beat/0", 0), time.monotonic()
            if beats != seen:
                seen, since = beats, now
            elif seen and now - since > BEAT_TIMEOUT:
                log.error("rank 0 stopped answering; exiting")
                os._exit(1)
            time.sleep(BEAT_SECONDS)
    except Exception:  # noqa: BLE001 - rank 0 (which hosts the store, or torchrun's agent) is gone
        os._exit(1)


@torch.inference_mode()
def _serve_steps(pipe: Pipeline, channel, comm) -> None:
    import torch.distributed as dist

    c = pipe.held_config  # NOTE: this rank's heads
    shape = CacheShape(c.num_layers, c.num_kv_heads, c.head_dim)
    pools: dict[int, KVCachePool] = {}
    views: dict[int, object] = {}
    while True:
        message = comm.receive() if comm is not None else None
        if message is None:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=channel)
            message = box[0]
        for op in message:
            kind = op[0]
            if kind == "stop":
                return
            pool_id, arg = op[1], op[2]
            if kind == "pool":
                blocks, block_size, streams, slots, slot_blocks, unzeroed = arg
                pool = KVCachePool(shape, blocks, block_size, pipe.dtype, pipe.device, streams=streams, num_slots=slots)
                pool._slot_blocks, pool._unzeroed = slot_blocks, set(unzeroed)
                pools[pool_id] = pool
            elif kind == "zero":
                pools[pool_id].zero_blocks(arg)
            elif kind == "release":
                pools[pool_id].release_blocks(arg)
            elif kind == "view":
                views[pool_id] = pools[pool_id].build_view(*arg)
            elif kind == "forward":
                ids = torch.tensor(arg, dtype=torch.long, device=pipe.device)
                pipe.model(ids, views.pop(pool_id), pools[pool_id])


def _use_comm(pipe: Pipeline, comm) -> None:
    """The model's collectives go through `comm` where there is one (its layers share one Shard)."""
    shard = getattr(pipe.model, "tp", None)
    if shard is not None:
        shard.comm = comm


def run_torchrun_worker(spec: ModelSpec, threads: Optional[int] = None) -> None:
    """A rank other than 0 under torchrun: the same command line as rank 0, run as a worker."""
    launch = from_torchrun()
    assert launch is not None and launch.rank != 0
    run_worker(launch, spec, threads)
