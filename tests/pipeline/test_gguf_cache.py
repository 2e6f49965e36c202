"""The load cache (pipeline/gguf_cache.py): a second load of a GGUF file reads its metadata and its
packed weights from the cache and gives the same model; a changed file (even one rewritten in place
with its size and modification time kept) or a damaged entry is never served from it; a directory
shared with other files loses none of them."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.models import qmatmul
from mistralrs_py.models.quant_kernels import Qmm
from mistralrs_py.pipeline import gguf as gguf_loader
from mistralrs_py.pipeline import gguf_cache
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline
from tests.conftest import make_tiny_model
from tests.gguf_util import write_gguf

IDS = list(range(10, 30))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MISTRALRS_LOAD_CACHE_DIR", str(d))
    monkeypatch.delenv("MISTRALRS_LOAD_CACHE", raising=False)
    return d


def load(path):
    return load_pipeline(
        ModelSpec(ModelKind.GGUF, quantized_model_id=str(path.parent), quantized_filename=path.name, device="cpu")
    )


def logits(pipe):
    pool = KVCachePool.for_pipeline(pipe, 1)
    view = pool.build_view([], [(0, 0, len(IDS))], pipe.config.sliding_window, [True])
    with torch.no_grad():
        return pipe.model.lm_head(pipe.model.hidden_states(torch.tensor(IDS), view, pool)).float()


def tiny(tmp_path, name="m", seed=3):
    hf = make_tiny_model(tmp_path / f"hf-{name}", "llama", seed=seed)
    (tmp_path / name).mkdir()
    return write_gguf(hf, tmp_path / name / "tiny.gguf")


def test_a_second_load_reads_the_cache_and_gives_the_same_model(tmp_path, cache, monkeypatch):
    path = tiny(tmp_path)
    first = load(path)
    want, kinds = logits(first), first.summary["format"]
    assert sorted(p.suffix for p in cache.iterdir()) == (
        [".json", ".safetensors"] if qmatmul.available() else [".json"]
    )
    assert gguf_cache.load_metadata(path) == gguf_loader._parse_gguf(path)

    def no_parse(p):
        raise AssertionError("parsed again")

    def no_pack(*a, **k):
        raise AssertionError("packed again")

    monkeypatch.setattr(gguf_loader, "_parse_gguf", no_parse)
    monkeypatch.setattr(Qmm, "build", no_pack)
    second = load(path)
    assert second.summary["format"] == kinds
    assert torch.equal(logits(second), want)


def test_a_changed_file_is_read_again(tmp_path, cache):
    path = tiny(tmp_path)
    before = logits(load(path))
    other = tiny(tmp_path, "other", seed=9)
    os.replace(other, path)  # the same path, other weights
    fresh = load(path)
    assert not torch.equal(logits(fresh), before)
    cold = load_pipeline(
        ModelSpec(ModelKind.GGUF, quantized_model_id=str(path.parent), quantized_filename=path.name, device="cpu")
    )
    assert torch.equal(logits(cold), logits(fresh))


def test_damaged_entries_are_ignored_and_written_again(tmp_path, cache):
    path = tiny(tmp_path)
    want = logits(load(path))
    entries = sorted(cache.iterdir())
    for e in entries:
        e.write_bytes(e.read_bytes()[: e.stat().st_size // 2])
    assert gguf_cache.load_metadata(path) is None
    again = load(path)
    assert torch.equal(logits(again), want)
    assert gguf_cache.load_metadata(path) == gguf_loader._parse_gguf(path)  # rewritten whole


def test_the_cache_can_be_turned_off(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("MISTRALRS_LOAD_CACHE", "0")
    load(tiny(tmp_path))
    assert not cache.exists() or not any(cache.iterdir())


def test_explicit_float32_packs_nothing_and_a_cached_file_still_checks_its_tensors(tmp_path, cache):
    path = tiny(tmp_path)
    spec = ModelSpec(
        ModelKind.GGUF, quantized_model_id=str(path.parent), quantized_filename=path.name, device="cpu", dtype="float32"
    )
    pipe = load_pipeline(spec)
    assert "qmm" not in pipe.summary["format"] and not list(cache.glob("*.safetensors"))
    # a cached table is checked against the file like a parsed one: an offset past its end is refused
    fields, infos, start, align = gguf_cache.load_metadata(path)
    name, qt, shape, off, n = infos[0]
    infos[0] = (name, qt, shape, path.stat().st_size, n)
    gguf_cache.save_metadata(path, fields, infos, start, align)
    with pytest.raises(Exception, match="past the end"):
        load_pipeline(spec)


def uncached_logits(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("MISTRALRS_LOAD_CACHE", "0")
        return logits(load(path))


def test_a_file_rewritten_in_place_with_its_size_and_mtime_kept_is_read_again(tmp_path, cache, monkeypatch):
    # NOTE: the key hashes the file's first and last MiB, which is all of a tiny file; a multi-GB model
    # rewritten in place (`cp -p`, `rsync -t`) can keep both. Hashing 32 bytes stands in for that here.
    monkeypatch.setattr(gguf_cache, "_EDGE", 32)
    gguf_cache._file_key.cache_clear()
    path = tiny(tmp_path)
    before, old = logits(load(path)), path.read_bytes()
    new = bytearray(tiny(tmp_path, "other", seed=9).read_bytes())  # other weights, the same layout
    new[-32:] = old[-32:]
    at = new.index(b"tiny", new.index(b"general.name"))
    new[at : at + 4] = b"tinz"  # and another name, past the hashed edge
    assert len(new) == len(old) and at > 32 and new[:32] == old[:32]
    st = path.stat()
    with open(path, "r+b") as f:  # in place: the same inode, size and (below) modification time
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    fresh = logits(load(path))
    assert gguf_cache.load_metadata(path)[0]["general.name"] == "tinz"
    assert gguf_cache.load_metadata(path) == gguf_loader._parse_gguf(path)
    assert torch.equal(fresh, uncached_logits(path, monkeypatch)) and not torch.equal(fresh, before)


def _flip(entry, start, n=16):
    """XORs n bytes at start: the entry's structure stays whole, its data does not."""
    b = bytearray(entry.read_bytes())
    b[start : start + n] = bytes(x ^ 0x5A for x in b[start : start + n])
    entry.write_bytes(b)


def test_a_metadata_entry_damaged_inside_is_deleted_and_written_again(tmp_path, cache):
    path = tiny(tmp_path)
    want = logits(load(path))
    (entry,) = cache.glob("*.json")
    good = entry.read_bytes()
    text = good.decode()
    old, new = '"llama.rope.freq_base": 10000.0', '"llama.rope.freq_base": 90000.0'  # still valid JSON
    entry.write_text(text.replace(old, new), encoding="utf-8")
    assert len(entry.read_bytes()) == len(good) and entry.read_bytes() != good
    assert gguf_cache.load_metadata(path) is None and not entry.exists()  # ignored and deleted
    entry.write_text(text.replace(old, new), encoding="utf-8")
    assert torch.equal(logits(load(path)), want)
    assert entry.read_bytes() == good  # written again, whole


@pytest.mark.skipif(not qmatmul.available(), reason="nothing is packed without our quantized matmul kernels")
def test_a_packed_entry_damaged_inside_is_deleted_and_written_again(tmp_path, cache):
    path = tiny(tmp_path)
    want = logits(load(path))
    (entry,) = cache.glob("*.safetensors")
    good = entry.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    name = next(k for k in sorted(header) if k.endswith(".qs"))
    begin, end = header[name]["data_offsets"]
    _flip(entry, 8 + n + (begin + end) // 2)  # inside one layer's packed codes
    assert torch.equal(logits(load(path)), want)
    again, before = safetensors.torch.load_file(entry), safetensors.torch.load(good)  # written again, whole
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)


def test_a_shared_directory_keeps_every_file_the_cache_did_not_write(tmp_path, cache, monkeypatch):
    cache.mkdir()
    theirs = [f"model-{i:05d}-of-00008.safetensors" for i in range(1, 9)]
    theirs += ["config.json", "tokenizer.json", "generation_config.json", "0" * 40 + ".safetensors"]
    theirs += [f"adapter-{i}.json" for i in range(70)] + ["mistralrs-load-x.tmp.partial"]
    for name in theirs:
        (cache / name).write_text(name)
        os.utime(cache / name, (1e9, 1e9))  # older than every entry: the first to go if the cache took them
    (cache / "mistralrs-load-stale.tmp").write_text("left by a start that died")
    os.utime(cache / "mistralrs-load-stale.tmp", (1e9, 1e9))
    (cache / "mistralrs-load-fresh.tmp").write_text("being written by another start")
    qs, d = torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1, 1)
    for i in range(70):
        f = tmp_path / f"f{i}.gguf"
        f.write_bytes(b"GGUF%d" % i)
        gguf_cache.save_metadata(f, {"i": i}, [], 0, 32)
        gguf_cache.save_packed(f, "v", {"x": (qs, d, d.clone(), 4, "q4")})
    for name in theirs:
        assert (cache / name).read_text() == name
    assert not (cache / "mistralrs-load-stale.tmp").exists() and (cache / "mistralrs-load-fresh.tmp").exists()
    ours = sorted(p.suffix for p in cache.iterdir() if p.name not in theirs and p.suffix != ".tmp")
    assert ours == [".json"] * 64 + [".safetensors"] * 4  # the cache's own past its limits are pruned
    assert gguf_cache.load_metadata(f) == ({"i": 69}, [], 0, 32)  # the newest stays


def test_the_default_directory_drops_the_entries_an_older_version_named(tmp_path, monkeypatch):
    monkeypatch.delenv("MISTRALRS_LOAD_CACHE_DIR", raising=False)
    monkeypatch.delenv("MISTRALRS_LOAD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = gguf_cache.cache_root()
    root.mkdir(parents=True)
    legacy = [root / ("a" * 40 + ".safetensors"), root / ("b" * 40 + ".json")]
    for p in legacy:
        p.write_text("{}")
    (tmp_path / "f.gguf").write_bytes(b"GGUF")
    gguf_cache.save_metadata(tmp_path / "f.gguf", {}, [], 0, 32)
    assert not any(p.exists() for p in legacy) and len(list(root.glob("mistralrs-load-*.json"))) == 1
