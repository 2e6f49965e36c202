"""The load cache (pipeline/gguf_cache.py): a second load of a GGUF file reads its metadata and its
packed weights from the cache and gives the same model; a changed file or a damaged entry is never
served from it."""

from __future__ import annotations

import os

import pytest
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
