"""Tensor parallelism's collectives through shared memory, for ranks on one machine's CPUs.

gloo's all-reduce goes through TCP on the loopback: ~1.3 ms each on this project's machine, and a
decode step of the embedded model makes 62 of them (two a layer, the embedding, the logits), so
split over two processes it ran at 7 tokens/s against 50 in one. Here each rank writes its part into
a shared mapping, raises its flag, waits for the others' flags and sums the parts in rank order (so
every rank holds the same bits): microseconds. vLLM's CPU backend does the same for the same reason.
Rank 0's step messages (pickled) go the same way. gloo stays the path between machines, on GPUs
(NCCL), and for anything larger than a slot (every rank takes the same path: the sizes are equal).

Layout of the mapping: one 64-byte line of flags per rank (collective counter), one line for
messages (counter, then the length for each of the two message areas), then two sets (by the
counter's parity) of `world` slots, then two message areas.
NOTE: why two sets suffice: a rank writes set p again only at collective s + 2, after every rank
raised its flag for s + 1, which each does only after it has read set p of collective s. The same
holds for messages, as every step's message is followed by collectives of that step.
NOTE: x86 keeps a thread's stores in order (the data, then the flag) and its loads in order, which
this relies on; elsewhere gloo is used.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import platform
import time
import uuid
from typing import Callable, Optional

import numpy as np
import torch

log = logging.getLogger("mistralrs.tp")

_LINE = 64  # bytes: one cache line per rank's flag (no false sharing)
SLOT_BYTES = 8 << 20  # the largest tensor a rank contributes (a prefill chunk of 512 x 4096 floats)
MESSAGE_BYTES = 4 << 20
_SPIN = 2000  # waits before the first check for a failed peer, and between checks


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


class SharedMemoryComm:
    def __init__(
        self,
        path: str,
        rank: int,
        world: int,
        create: bool,
        slot_bytes: int = SLOT_BYTES,
        message_bytes: int = MESSAGE_BYTES,
    ):
        self.rank, self.world, self.slot_bytes, self.message_bytes = rank, world, slot_bytes, message_bytes
        self.header = _LINE * (world + 1)
        self.data = self.header
        self.messages = self.data + 2 * world * slot_bytes
        size = self.messages + 2 * message_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mem = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.bytes = torch.frombuffer(self._mem, dtype=torch.uint8)
        self.flags = np.frombuffer(self._mem, dtype=np.int64, count=self.header // 8)
        self._peers = [r * (_LINE // 8) for r in range(world)]
        self._msg = world * (_LINE // 8)  # message counter; the two lengths follow it
        self.seq = 0
        self.msg_seq = 0
        self.failed: Callable[[], Optional[str]] = lambda: None  # set by rank 0: the group's failure

    # ---- waiting -------------------------------------------------------------------------------
    def _wait_all(self, seq: int) -> None:
        flags, peers, spins = self.flags, self._peers, 0
        while True:
            if all(flags[p] >= seq for p in peers):
                return
            spins += 1
            if spins % _SPIN == 0:
                why = self.failed()
                if why:
                    raise RuntimeError(f"tensor parallelism failed: {why}")
                if spins > 50 * _SPIN:
                    time.sleep(0)  # NOTE: a slow peer (a long prefill): let it have the core

    # ---- collectives ---------------------------------------------------------------------------
    def _parts(self, seq: int, nbytes: int, dtype: torch.dtype) -> list[torch.Tensor]:
        base = self.data + (seq & 1) * self.world * self.slot_bytes
        return [
            self.bytes[base + r * self.slot_bytes : base + r * self.slot_bytes + nbytes].view(dtype)
            for r in range(self.world)
        ]

    def all_reduce(self, x: torch.Tensor) -> bool:
        """Sums x over the ranks in place; False (nothing done) when x does not fit a slot."""
        nbytes = x.numel() * x.element_size()
        if nbytes > self.slot_bytes or not x.is_contiguous() or x.device.type != "cpu":
            return False
        self.seq += 1
        parts = self._parts(self.seq, nbytes, x.dtype)
        flat = x.view(-1)
        parts[self.rank].copy_(flat)
        self.flags[self._peers[self.rank]] = self.seq
        self._wait_all(self.seq)
        flat.copy_(parts[0])  # NOTE: in rank order on every rank: the same bits everywhere
        for p in parts[1:]:
            flat.add_(p)
        return True

    def gather(self, x: torch.Tensor, keep: bool):
        """Every rank's x (all of one shape) as views of the shared slots, read them before the next
        collective; None on the ranks that do not `keep` them; False (nothing done) when x does not
        fit a slot."""
        nbytes = x.numel() * x.element_size()
        if nbytes > self.slot_bytes or x.device.type != "cpu":
            return False
        self.seq += 1
        parts = self._parts(self.seq, nbytes, x.dtype)
        parts[self.rank].copy_(x.reshape(-1))
        self.flags[self._peers[self.rank]] = self.seq
        self._wait_all(self.seq)
        return [p.view(x.shape) for p in parts] if keep else None

    # ---- rank 0's step messages --------------------------------------------------------------------
    def send(self, obj) -> bool:
        """Rank 0: publishes a message; False when it is too large (then it goes by gloo, and the
        workers are told so)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.msg_seq += 1
        par = self.msg_seq & 1
        fits = len(data) <= self.message_bytes
        if fits:
            start = self.messages + par * self.message_bytes
            self.bytes[start : start + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.flags[self._msg + 1 + par] = len(data) if fits else -1
        self.flags[self._msg] = self.msg_seq
        return fits

    def receive(self):
        """Workers: the next message, or None when it comes by gloo. Waits as long as rank 0 is idle
        (spinning briefly, then sleeping a little longer each time, up to a millisecond)."""
        self.msg_seq += 1
        flags, seq, spins = self.flags, self.msg_seq, 0
        while flags[self._msg] < seq:
            spins += 1
            if spins > _SPIN:
                time.sleep(min(1e-3, 1e-6 * (spins - _SPIN)))
        par = seq & 1
        n = int(flags[self._msg + 1 + par])
        if n < 0:
            return None
        start = self.messages + par * self.message_bytes
        return pickle.loads(self.bytes[start : start + n].numpy().tobytes())


def _sizes() -> dict:
    # NOTE: the tests shrink the slots and message areas to send some of a run by gloo
    env = os.environ
    return dict(
        slot_bytes=int(env.get("MISTRALRS_TP_SHM_SLOT_BYTES", SLOT_BYTES)),
        message_bytes=int(env.get("MISTRALRS_TP_SHM_MESSAGE_BYTES", MESSAGE_BYTES)),
    )


def connect(rank: int, world: int, store, channel) -> Optional[SharedMemoryComm]:
    """The shared mapping of a group whose ranks all run on this machine (every rank calls it), or
    None where it cannot be made: then every rank stays on gloo."""
    import torch.distributed as dist

    comm = None
    try:
        if rank == 0:
            path = f"/dev/shm/mistralrs-tp-{uuid.uuid4().hex}" if supported() else ""
            try:
                comm = SharedMemoryComm(path, 0, world, create=True, **_sizes()) if path else None
            except OSError as e:
                log.warning("shared memory for tensor parallelism: %s; using gloo", e)
                path = ""
            store.set("shm", path)
        else:
            path = store.get("shm").decode()
            comm = SharedMemoryComm(path, rank, world, create=False, **_sizes()) if path else None
    except OSError as e:
        log.warning("shared memory for tensor parallelism: %s; using gloo", e)
        comm = None
    # NOTE: all ranks agree (one may have failed to map it), then the name leaves the file system
    ok = torch.tensor([1 if comm is not None else 0], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=channel)
    if rank == 0 and path:
        os.unlink(path)
    return comm if int(ok) == 1 else None
