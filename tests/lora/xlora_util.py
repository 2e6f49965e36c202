"""X-LoRA checkpoints built with PEFT on tiny random models, exported to the xlora package's layout,
and PEFT's XLoraModel as the reference (spec §7/§9: adapter keys "0".."n-1", base use_cache=False)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.lora.ordering import LEAF_NAMES, make_ordering
from mistralrs_py.pipeline.base import ModelKind, ModelSpec

ALL = list(LEAF_NAMES)


@dataclass
class XLoraCase:
    peft: object  # PeftModelForCausalLM wrapping XLoraModel
    xlora_dir: Path
    ordering: Path
    names: list[str]
    adapter_dirs: list[Path]
    base_kwargs: dict
    n_layers: int  # wrapped linears (L)

    def spec(self, **kw) -> ModelSpec:
        base = (
            dict(model_id=str(self.base_kwargs["pretrained_model_name_or_path"]))
            if "gguf_file" not in self.base_kwargs
            else dict(
                quantized_filename=str(
                    Path(self.base_kwargs["pretrained_model_name_or_path"]) / self.base_kwargs["gguf_file"]
                )
            )
        )
        args = dict(xlora_model_id=str(self.xlora_dir), order=str(self.ordering), dtype="float32", device="cpu", **base)
        return ModelSpec(ModelKind.XLORA, **{**args, **kw})

    @property
    def classifier(self):
        return self.peft.base_model.internal_xlora_classifier


def load_base(**base_kwargs):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(**base_kwargs, dtype=torch.float32).eval()
    m.config.use_cache = False
    return m


def build_xlora(
    base_dir: Path,
    out: Path,
    *,
    ranks=(4, 6, 2),
    alphas=(8.0, 6.0, 8.0),
    targets=ALL,
    seed=0,
    depth=2,
    size=16,
    layerwise=True,
    enable_softmax=True,
    temperature=1.0,
    top_k=None,
    softmax_topk=False,
    g=1.0,
    spv=0.0,
    names=None,
    clf_std=0.6,
    lora_std=0.15,
    adapter_dtype=None,
    xlora_pkg_names=False,
    dropout=0.2,
    gguf_file: str | None = None,
) -> XLoraCase:
    """Adapters with random A and B (PEFT saves them), then PEFT's X-LoRA with a random classifier."""
    from peft import LoraConfig, XLoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base_kwargs = {"pretrained_model_name_or_path": str(base_dir), **({"gguf_file": gguf_file} if gguf_file else {})}
    n = len(ranks)
    names = list(names or [f"adapter_{chr(97 + i)}" for i in range(n)])
    g_ = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for i in range(n):
        pm = get_peft_model(
            load_base(**base_kwargs),
            LoraConfig(r=ranks[i], lora_alpha=alphas[i], target_modules=list(targets), lora_dropout=0.1),
        )
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g_) * lora_std)
        d = out / names[i]
        pm.save_pretrained(str(d))
        if adapter_dtype is not None:
            f = d / "adapter_model.safetensors"
            save_file({k: v.to(adapter_dtype) for k, v in load_file(str(f)).items()}, str(f))
        dirs.append(d)
    base = load_base(**base_kwargs)
    H = base.config.hidden_size
    xcfg = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=H,
        adapters={str(i): str(d) for i, d in enumerate(dirs)},
        xlora_depth=depth,
        xlora_size=size,
        layerwise_scalings=layerwise,
        enable_softmax=enable_softmax,
        softmax_temperature=temperature,
        top_k_lora=top_k,
        enable_softmax_topk=softmax_topk,
        global_scaling_weight=g,
        scaling_pass_value=spv,
        xlora_dropout_p=dropout,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(base, xcfg).eval()
    clf = peft.base_model.internal_xlora_classifier
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(torch.randn(p.shape, generator=g_) * clf_std)
    export_classifier(clf, out / "xlora_classifier.safetensors", xlora_pkg_names)
    (out / "xlora_config.json").write_text(
        json.dumps(
            {
                "hidden_size": H,
                "adapters": {nm: f"./{nm}" for nm in names},
                "layerwise_scalings": layerwise,
                "enable_relu_and_dropout": True,
                "xlora_depth": depth,
                "xlora_size": size,
                "xlora_dropout_p": dropout,
                "enable_softmax": enable_softmax,
                "softmax_temperature": temperature,
                "scaling_pass_value": spv,
                "use_bias": True,
                "global_scaling_weight": g,
                "top_k_lora": top_k,
                "enable_softmax_topk": softmax_topk,
            }
        )
    )
    num_layers = base.config.num_hidden_layers
    ordering = make_ordering(num_layers, names, targets)
    (out / "ordering.json").write_text(ordering.to_json())
    return XLoraCase(peft, out, out / "ordering.json", names, dirs, base_kwargs, len(ordering.layers))


def export_classifier(clf, path: Path, xlora_pkg_names: bool = False) -> None:
    """PEFT's `layers.{j}` Sequential -> `inner.{i}` + `last`. With xlora_pkg_names, inner Linears keep
    their ModuleList index (inner.0, inner.3, ...: ReLU and Dropout take indices), as the xlora package saved."""
    from safetensors.torch import save_file

    linears = [(j, m) for j, m in enumerate(clf.layers) if isinstance(m, torch.nn.Linear)]
    t = {}
    for k, (j, m) in enumerate(linears[:-1]):
        i = j if xlora_pkg_names else k
        t[f"inner.{i}.weight"], t[f"inner.{i}.bias"] = m.weight.detach().clone(), m.bias.detach().clone()
    last = linears[-1][1]
    t["last.weight"], t["last.bias"] = last.weight.detach().clone(), last.bias.detach().clone()
    save_file(t, str(path))


def ref(case: XLoraCase, ids: list[int]):
    """PEFT's logits [T, V] and scalings [T, L, n] for one sequence (full recomputation)."""
    with torch.no_grad():
        out = case.peft(input_ids=torch.tensor([ids]))
    return out.logits[0], case.peft.base_model.get_latest_scalings()[0]


def make_pool(pipe, slots=4):
    return KVCachePool.for_pipeline(pipe, slots)


def step(pipe, pool, decode=(), prefill=(), all_rows=False):
    """decode: [(slot, pos, token)]; prefill: [(slot, start, tokens)] -> logits rows (all rows with all_rows)."""
    ids = [t for _, _, t in decode] + [t for _, _, toks in prefill for t in toks]
    view = pool.build_view(
        [(s, p) for s, p, _ in decode],
        [(s, st, len(toks)) for s, st, toks in prefill],
        pipe.config.sliding_window,
        [True] * len(prefill),
    )
    if all_rows:
        view.logit_rows = torch.arange(len(ids))
    return pipe.forward(torch.tensor(ids), view, pool)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def full_scalings(pipe) -> torch.Tensor:
    """The latest step's scalings as [N, L, n] (a non-layerwise classifier gives one row for all layers)."""
    s = pipe.last_scalings
    return s.expand(s.shape[0], pipe.xlora.L, s.shape[2])
