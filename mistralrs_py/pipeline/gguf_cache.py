"""The on-disk cache of what loading a GGUF file computes, so that the next start skips it: the
parsed metadata, and the weights our quantized matmuls use, already packed.

The gguf package's reader builds a numpy view per array element: for a 49k-token vocabulary (the
embedded model's) that is ~3 s of a ~4 s load. What it yields (every field as plain values, the
tensor table, the data section's offset and alignment) is kept here as JSON, keyed by the file's
identity: its resolved path, size, modification time, device, inode and change time (ctime), and a
hash of its first and last MiB (where the metadata and the last tensor lie). A file rewritten in place
with its size and modification time kept (`cp -p`, `rsync -t`) still has a new ctime, so it gets a
new key; the file is never hashed whole (a warm start reads those 2 MiB of it). Entries are written to a
temporary file and renamed into place, so concurrent starts never read half an entry.

Packed weights (`Qmm`: qmatmul.py's layout, ~0.6 s of packing for the embedded model, minutes for
7B ones) are saved as safetensors once a load has made them and mapped back: not copied, read from
the page cache as the model runs. Their key adds the
compute dtype, the kernel preference, the instruction set and the source of the code that chooses
and packs them.

Every entry carries a CRC-32 of its contents, written with it and checked when it is read back (for
packed weights: each tensor's name, dtype, shape and bytes; ~40 ms for the embedded model's ~100 MB,
read from the page cache). An entry that does not read back whole (damaged, truncated, another
format) is ignored, deleted and written again by the load.

The tensor table is checked against the file on every load (gguf.read_gguf), cached or not.
`MISTRALRS_LOAD_CACHE=0` turns the cache off; it lives in ``~/.cache/mistralrs-py/gguf`` (or under
``$XDG_CACHE_HOME``, or in ``$MISTRALRS_LOAD_CACHE_DIR``) and can be deleted at any time. It keeps
the 64 most recent metadata entries and the 4 most recent packed ones (each the size of its model's
quantized weights), and deletes only files of its own names (``mistralrs-load-<40 hex
digits>.json|.safetensors``, and its temporary files once a day old): a directory shared with other
files (a model's shards, its config.json) is used without touching them."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import zlib
from pathlib import Path

log = logging.getLogger("mistralrs.load")
FORMAT = 2  # NOTE: bump when what is stored (or how read_gguf_fields renders a field) changes
_EDGE = 1 << 20
_PREFIX = "mistralrs-load-"
_ENTRY = re.compile(r"mistralrs-load-[0-9a-f]{40}\.(json|safetensors)")
_TEMP = re.compile(r"mistralrs-load-\w+\.tmp")  # tempfile.mkstemp(prefix=_PREFIX, suffix=".tmp")
_LEGACY = re.compile(r"[0-9a-f]{40}\.(json|safetensors)")  # FORMAT 1's names (no prefix)
_KEEP = {"json": 64, "safetensors": 4}  # entries of each kind; the least recently used go first
_STALE_S = 24 * 3600  # a temporary file this old was left by a start that died while writing it


def enabled() -> bool:
    return os.environ.get("MISTRALRS_LOAD_CACHE", "1") != "0"


def cache_root() -> Path:
    from ..models.kernels import cache_dir

    own = os.environ.get("MISTRALRS_LOAD_CACHE_DIR")
    return Path(own) if own else cache_dir() / "gguf"


def file_key(path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    # NOTE: size and mtime alone miss a file rewritten in place with both kept (`cp -p`, `rsync -t`,
    # an image layer): its packed weights would come from the old file and the rest from the new one.
    # Any write (and any utime that restores the mtime) sets the ctime to now, and no call sets it
    # back; a file replaced by another (mv, os.replace) has another inode. The edge hash stays for
    # file systems whose ctime is coarse or synthesised.
    return _file_key(str(path), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)


@functools.lru_cache(maxsize=16)
def _file_key(path: str, size: int, mtime_ns: int, dev: int, ino: int, ctime_ns: int) -> str:
    # NOTE: memoised on the file's identity: a load asks for it up to three times
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([FORMAT, path, size, mtime_ns, dev, ino, ctime_ns]).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def _crc(chunks) -> str:
    # NOTE: a checksum against damage (a flipped bit, a partial copy), not against someone who can
    # write to the cache: CRC-32 runs at a few GB/s, ~4x blake2b, on every warm start's packed weights
    c = 0
    for chunk in chunks:
        c = zlib.crc32(chunk, c)
    return f"{c:08x}"


def _drop(entry: Path | None, why) -> None:
    log.debug("ignoring the load cache entry %s: %s", entry, why)
    if entry is not None:
        try:
            entry.unlink(missing_ok=True)  # NOTE: ours by its name; the load writes it again
        except OSError:
            pass


def _entry(path: Path) -> Path:
    return cache_root() / f"{_PREFIX}{file_key(path)}.json"


def load_metadata(path: Path):
    """(fields, tensor infos [(name, qtype, shape, offset, n_bytes)], data offset, alignment) as
    saved for this exact file, or None (no entry, the cache off, or an entry that does not read)."""
    if not enabled():
        return None
    entry = None
    try:
        entry = _entry(path)
        if not entry.exists():
            return None
        # NOTE: line 1 is {"format", "crc32" of the rest}; the rest the body (json.dump escapes newlines)
        head, _, body = entry.read_bytes().partition(b"\n")
        head = json.loads(head)
        if head["format"] != FORMAT or head["crc32"] != _crc([body]):
            raise ValueError("its checksum or format does not match")
        d = json.loads(body)
        infos = [(str(n), int(q), tuple(int(x) for x in s), int(o), int(b)) for n, q, s, o, b in d["tensors"]]
        out = dict(d["fields"]), infos, int(d["data_offset"]), int(d["alignment"])
        _touch(entry)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        _drop(entry, e)
        return None


def save_metadata(path: Path, fields: dict, infos: list, data_offset: int, alignment: int) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) only costs the next
    start its time."""
    if not enabled():
        return
    try:
        entry = _entry(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "source": str(Path(path).resolve()),
            "fields": fields,
            "tensors": [list(t) for t in infos],
            "data_offset": data_offset,
            "alignment": alignment,
        }
        data = json.dumps(body).encode()
        head = json.dumps({"format": FORMAT, "crc32": _crc([data])}).encode()
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=_PREFIX, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head + b"\n" + data)
            os.replace(tmp, entry)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(entry.parent)
    except (OSError, TypeError, ValueError) as e:
        log.debug("could not cache the metadata of %s: %s", path, e)


def _prune(root: Path) -> None:
    """The least recently used entries past _KEEP go, with stale temporary files and (only in the
    default directory, which holds nothing else) FORMAT 1's entries; a file of any other name stays."""
    default = not os.environ.get("MISTRALRS_LOAD_CACHE_DIR")
    entries: dict[str, list] = {kind: [] for kind in _KEEP}
    now = time.time()
    for p in root.iterdir():
        try:
            m = _ENTRY.fullmatch(p.name)
            if m:
                entries[m[1]].append((p.stat().st_mtime_ns, p))
            elif (_TEMP.fullmatch(p.name) and now - p.stat().st_mtime > _STALE_S) or (
                default and _LEGACY.fullmatch(p.name)
            ):
                p.unlink(missing_ok=True)
        except OSError:
            pass  # NOTE: another start may have deleted it meanwhile
    for kind, keep in _KEEP.items():
        for _, old in sorted(entries[kind])[:-keep]:
            try:
                old.unlink(missing_ok=True)
            except OSError:
                pass


def _touch(entry: Path) -> None:
    try:
        os.utime(entry)  # NOTE: marks it recently used, for _prune
    except OSError:
        pass


def _packed_entry(path: Path, variant: str) -> Path:
    from ..models import ggml_blocks, qmatmul, quant, quant_kernels

    h = hashlib.blake2b(digest_size=20)
    h.update(f"{file_key(path)}|{variant}|{qmatmul.isa()}".encode())
    for mod in (quant, quant_kernels, qmatmul, ggml_blocks):
        h.update(Path(mod.__file__).read_bytes())
    return cache_root() / f"{_PREFIX}{h.hexdigest()}.safetensors"


def _packed_crc(layers: str, tensors: dict) -> str:
    """Over the layer table and each tensor's name, dtype, shape and bytes (read in place, not copied)."""
    import torch

    def chunks():
        yield layers.encode()
        for name in sorted(tensors):
            t = tensors[name]
            yield f"|{name}|{t.dtype}|{list(t.shape)}|".encode()
            yield t.contiguous().reshape(-1).view(torch.uint8).numpy()

    return _crc(chunks())


def load_packed(path: Path, variant: str) -> dict | None:
    """{module name: (qs, d, mw, bits, kind)} as saved for this file, variant and code, the tensors
    mapped from the entry; None when there is none (or it does not read)."""
    if not enabled():
        return None
    entry = None
    try:
        from safetensors import safe_open

        entry = _packed_entry(path, variant)
        if not entry.exists():
            return None
        out = {}
        with safe_open(str(entry), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT):
                raise ValueError(f"format {meta.get('format')}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("crc32") != _packed_crc(meta["layers"], tensors):
            raise ValueError("its checksum does not match")
        for name, (bits, kind) in json.loads(meta["layers"]).items():
            qs, dd, mw = (tensors[f"{name}.{part}"] for part in ("qs", "d", "mw"))
            if not (qs.dim() == 2 and dd.dim() == 3 and dd.shape == mw.shape and qs.shape[0] == dd.shape[0]):
                raise ValueError(f"{name}: shapes {tuple(qs.shape)} {tuple(dd.shape)} {tuple(mw.shape)}")
            out[str(name)] = (qs, dd, mw, int(bits), str(kind))
        _touch(entry)
        return out
    except Exception as e:  # NOTE: a damaged file raises many kinds (safetensors' own, json's, ...)
        _drop(entry, e)
        return None


def save_packed(path: Path, variant: str, layers: dict) -> None:
    """layers: {module name: (qs, d, mw, bits, kind)}. Best effort, like save_metadata."""
    if not enabled() or not layers:
        return
    try:
        from safetensors.torch import save_file

        entry = _packed_entry(path, variant)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}.{part}": t.contiguous()
            for name, (qs, d, mw, _, _) in layers.items()
            for part, t in (("qs", qs), ("d", d), ("mw", mw))
        }
        table = json.dumps({n: [b, k] for n, (_, _, _, b, k) in layers.items()})
        meta = {"format": str(FORMAT), "layers": table, "crc32": _packed_crc(table, tensors)}
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=_PREFIX, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, entry)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(entry.parent)
    except (OSError, RuntimeError, ValueError) as e:
        log.debug("could not cache the packed weights of %s: %s", path, e)
