"""The on-disk cache of what loading a GGUF file computes, so that the next start skips it: the
parsed metadata, and the weights our quantized matmuls use, already packed.

The gguf package's reader builds a numpy view per array element: for a 49k-token vocabulary (the
embedded model's) that is ~3 s of a ~4 s load. What it yields (every field as plain values, the
tensor table, the data section's offset and alignment) is kept here as JSON, keyed by the file's
identity: its resolved path, size and modification time, and a hash of its first and last MiB (where
the metadata and the last tensor lie). A changed file gets a new key; an entry that does not read
back as what it should be is ignored and written again. Entries are written to a temporary file and
renamed into place, so concurrent starts never read half an entry.

Packed weights (`Qmm`: qmatmul.py's layout, ~0.6 s of packing for the embedded model, minutes for
7B ones) are saved as safetensors once a load has made them and mapped back: not copied, read from
the page cache as the model runs. Their key adds the
compute dtype, the kernel preference, the instruction set and the source of the code that chooses
and packs them.

The tensor table is checked against the file on every load (gguf.read_gguf), cached or not.
`MISTRALRS_LOAD_CACHE=0` turns the cache off; it lives in ``~/.cache/mistralrs-py/gguf`` (or under
``$XDG_CACHE_HOME``, or in ``$MISTRALRS_LOAD_CACHE_DIR``) and can be deleted at any time. It keeps
the 64 most recent metadata entries and the 4 most recent packed ones (each the size of its model's
quantized weights)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("mistralrs.load")
FORMAT = 1  # NOTE: bump when what is stored (or how read_gguf_fields renders a field) changes
_EDGE = 1 << 20
_KEEP = {"*.json": 64, "*.safetensors": 4}  # entries of each kind; the least recently used go first


def enabled() -> bool:
    return os.environ.get("MISTRALRS_LOAD_CACHE", "1") != "0"


def cache_root() -> Path:
    from ..models.kernels import cache_dir

    own = os.environ.get("MISTRALRS_LOAD_CACHE_DIR")
    return Path(own) if own else cache_dir() / "gguf"


def file_key(path: Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    return _file_key(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_key(path: str, size: int, mtime_ns: int) -> str:
    # NOTE: memoised on the file's identity: a load asks for it up to three times
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([FORMAT, path, size, mtime_ns]).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def _entry(path: Path) -> Path:
    return cache_root() / f"{file_key(path)}.json"


def load_metadata(path: Path):
    """(fields, tensor infos [(name, qtype, shape, offset, n_bytes)], data offset, alignment) as
    saved for this exact file, or None (no entry, the cache off, or an entry that does not read)."""
    if not enabled():
        return None
    try:
        entry = _entry(path)
        if not entry.exists():
            return None
        d = json.loads(entry.read_text(encoding="utf-8"))
        if d.get("format") != FORMAT:
            return None
        _touch(entry)
        infos = [(str(n), int(q), tuple(int(x) for x in s), int(o), int(b)) for n, q, s, o, b in d["tensors"]]
        return dict(d["fields"]), infos, int(d["data_offset"]), int(d["alignment"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("ignoring the metadata cache of %s: %s", path, e)
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
            "format": FORMAT,
            "source": str(Path(path).resolve()),
            "fields": fields,
            "tensors": [list(t) for t in infos],
            "data_offset": data_offset,
            "alignment": alignment,
        }
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f)
        os.replace(tmp, entry)
        _prune(entry.parent)
    except (OSError, TypeError, ValueError) as e:
        log.debug("could not cache the metadata of %s: %s", path, e)


def _prune(root: Path) -> None:
    for pattern, keep in _KEEP.items():
        entries = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-keep]:
            old.unlink(missing_ok=True)


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
    return cache_root() / f"{h.hexdigest()}.safetensors"


def load_packed(path: Path, variant: str) -> dict | None:
    """{module name: (qs, d, mw, bits, kind)} as saved for this file, variant and code, the tensors
    mapped from the entry; None when there is none (or it does not read)."""
    if not enabled():
        return None
    try:
        from safetensors import safe_open

        entry = _packed_entry(path, variant)
        if not entry.exists():
            return None
        out = {}
        with safe_open(str(entry), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT):
                return None
            for name, (bits, kind) in json.loads(meta["layers"]).items():
                qs, dd, mw = (f.get_tensor(f"{name}.{part}") for part in ("qs", "d", "mw"))
                if not (qs.dim() == 2 and dd.dim() == 3 and dd.shape == mw.shape and qs.shape[0] == dd.shape[0]):
                    return None
                out[str(name)] = (qs, dd, mw, int(bits), str(kind))
        _touch(entry)
        return out
    except Exception as e:  # NOTE: a damaged file raises many kinds (safetensors' own, json's, ...)
        log.debug("ignoring the packed-weight cache of %s: %s", path, e)
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
        meta = {"format": str(FORMAT), "layers": json.dumps({n: [b, k] for n, (_, _, _, b, k) in layers.items()})}
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, entry)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _prune(entry.parent)
    except (OSError, RuntimeError, ValueError) as e:
        log.debug("could not cache the packed weights of %s: %s", path, e)
