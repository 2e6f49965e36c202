"""--isq: llama.cpp's block formats made at load time from safetensors weights. The bytes are read
back with the gguf package's dequantizer (an independent reference for the format), and an ISQ model
stays close to its dense self and runs on the same kernels as GGUF files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mistralrs_py.models.isq import isq_type, quantizable, quantize, type_for
from mistralrs_py.pipeline.base import LoadError, ModelKind, ModelSpec, load_pipeline
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("name,qtype", [("q4_0", Q.Q4_0), ("q8_0", Q.Q8_0), ("q4_k", Q.Q4_K)])
def test_the_bytes_decode_with_ggufs_own_dequantizer(name, qtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 512, generator=g) * torch.linspace(0.01, 3, 512)  # scales that vary along the row
    w[1] = w[1].abs() + 0.5  # a row with no negative values (q4_k's min clamp)
    w[2, :256] = 0  # a super-block of zeros
    assert isq_type(name) == qtype and quantizable((6, 512), qtype)
    raw = quantize(w, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (
        6,
        512 // quants.GGML_QUANT_SIZES[qtype][0] * quants.GGML_QUANT_SIZES[qtype][1],
    )
    back = torch.from_numpy(quants.dequantize(raw, qtype)).reshape(6, 512)
    # each value is within half a quantization step of its level (Q4_0: one step at its clipped top)
    wb, eb = w.reshape(-1, 32), (back - w).reshape(-1, 32)
    if qtype == Q.Q4_K:
        # Q4_K's steps are per sub-block of 32: its range over 15 levels, the 6-bit scale rounding
        # up by at most 1/63 of the super-block's largest step
        rng = wb.max(-1).values - torch.minimum(wb.min(-1).values, torch.zeros(1))
        sup = rng.reshape(-1, 8).max(-1).values.repeat_interleave(8)
        bound = 0.5 * (rng / 15 + 2 * sup / 15 / 63) + 1e-6
    else:
        amax = wb.abs().max(-1).values
        # NOTE: the gguf package's reference quantizers (llama.cpp's): Q4_0 clips its top level
        bound = amax / 8 * 1.1 if qtype == Q.Q4_0 else amax / 127 * 0.6
    assert bool((eb.abs().max(-1).values <= bound).all()), (eb.abs().max(-1).values - bound).max()
    assert torch.equal(back[2, :256], torch.zeros(256))
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < {Q.Q4_0: 0.12, Q.Q8_0: 0.01, Q.Q4_K: 0.08}[qtype], rel


def test_unknown_types_and_partial_blocks():
    with pytest.raises(ValueError, match="q4_0, q8_0, q4_k"):
        isq_type("q3_k")
    assert not quantizable((4, 100), Q.Q4_0) and not quantizable((4, 128), Q.Q4_K)
    # as llama.cpp: rows that are not whole Q4_K super-blocks take Q5_0; rows of no whole block stay dense
    assert type_for((4, 128), Q.Q4_K) == Q.Q5_0 and type_for((4, 512), Q.Q4_K) == Q.Q4_K
    assert type_for((4, 100), Q.Q4_K) is None and type_for((4, 100), Q.Q8_0) is None


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Rows of 256 and 512 values: whole blocks for every ISQ type."""
    return make_tiny_model(
        tmp_path_factory.mktemp("wide"), "llama", seed=4, hidden_size=256, intermediate_size=512, num_attention_heads=4
    )


def qdq_checkpoint(src: Path, dst: Path, isq: str) -> Path:
    """The checkpoint with each linear's weight replaced by what the format stores (quantized by us,
    read back by the gguf package's dequantizer; the head as q8_0): the dense model an ISQ load must
    equal."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    (f,) = src.glob("*.safetensors")
    sd = load_file(str(f))
    for name, w in sd.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            qtype = type_for(tuple(w.shape), isq_type("q8_0" if name == "lm_head.weight" else isq))
            sd[name] = torch.from_numpy(quants.dequantize(quantize(w, qtype), qtype)).reshape(w.shape).to(w.dtype)
    save_file(sd, str(dst / f.name), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("isq", ["q8_0", "q4_0", "q4_k"])
def test_an_isq_model_equals_the_dense_model_of_what_the_format_stores(wide, isq, tmp_path):
    from tests.models.test_llama import make_pool, step

    spec = dict(kind=ModelKind.PLAIN, device="cpu", dtype="float32")
    q = load_pipeline(ModelSpec(**spec, model_id=str(wide), isq=isq))
    ref = load_pipeline(ModelSpec(**spec, model_id=str(qdq_checkpoint(wide, tmp_path / "qdq", isq))))
    dense = load_pipeline(ModelSpec(**spec, model_id=str(wide)))
    fmt = q.summary["format"]
    # every linear quantized, the head to q8_0
    assert "in-situ quantized" in fmt and f"{isq}->" in fmt.lower() and "q8_0->" in fmt.lower() and "dense x" not in fmt
    prompt = list(range(3, 40))
    a = step(q, make_pool(q, 1), prefill=[(0, 0, prompt)])
    b = step(ref, make_pool(ref, 1), prefill=[(0, 0, prompt)])
    c = step(dense, make_pool(dense, 1), prefill=[(0, 0, prompt)])
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
    assert not torch.allclose(b, c, atol=1e-3)  # and the quantization did change the model


@pytest.mark.parametrize("isq", ["q4_0", "q4_k"])
def test_4_bit_isq_holds_the_weights_in_4_bits(wide, isq):
    spec = dict(kind=ModelKind.PLAIN, model_id=str(wide), device="cpu", dtype="bfloat16")
    dense, q = load_pipeline(ModelSpec(**spec)), load_pipeline(ModelSpec(**spec, isq=isq))
    assert q.summary["weights_bytes"] < 0.6 * dense.summary["weights_bytes"]


def test_isq_refuses_a_gguf_model_with_the_fix():
    with pytest.raises(LoadError, match="serve it without --isq"):
        load_pipeline(ModelSpec(ModelKind.PLAIN, isq="q4_0"))


def test_x_lora_on_an_isq_base_equals_x_lora_on_the_stored_base(tiny_llama, tmp_path):
    from tests.lora.xlora_util import build_xlora, make_pool, step

    case = build_xlora(tiny_llama, tmp_path / "x", seed=5)
    q = load_pipeline(case.spec(isq="q8_0"))
    ref = load_pipeline(case.spec(model_id=str(qdq_checkpoint(tiny_llama, tmp_path / "qdq", "q8_0"))))
    assert "in-situ quantized" in q.summary["format"]
    prompt = list(range(3, 30))
    a = step(q, make_pool(q, 1), prefill=[(0, 0, prompt)])
    b = step(ref, make_pool(ref, 1), prefill=[(0, 0, prompt)])
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


def test_q4_k_on_rows_of_no_whole_super_block_takes_q5_0(tiny_llama, tmp_path):
    from tests.models.test_llama import make_pool, step

    spec = dict(kind=ModelKind.PLAIN, device="cpu", dtype="float32")
    q = load_pipeline(ModelSpec(**spec, model_id=str(tiny_llama), isq="q4_k"))  # rows of 64 and 128 values
    ref = load_pipeline(ModelSpec(**spec, model_id=str(qdq_checkpoint(tiny_llama, tmp_path / "qdq", "q4_k"))))
    fmt = q.summary["format"].lower()
    assert "q5_0->" in fmt and "q4_k->" not in fmt and "dense x" not in fmt
    prompt = list(range(3, 30))
    a = step(q, make_pool(q, 1), prefill=[(0, 0, prompt)])
    b = step(ref, make_pool(ref, 1), prefill=[(0, 0, prompt)])
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
