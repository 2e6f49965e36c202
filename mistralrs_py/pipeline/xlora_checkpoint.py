"""X-LoRA checkpoints in the xlora package's layout: finding, reading and checking the files.

    <xlora>/xlora_config.json  <xlora>/xlora_classifier.safetensors
    <xlora>/<adapter name>/adapter_config.json + adapter_model.safetensors   (any depth)

Everything here runs before any weight of the base model is loaded, except `wrapped_modules`,
which checks the checkpoint against the base model's config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..lora.classifier import XLoraConfig, XLoraConfigError
from ..lora.ordering import (
    LEAF_NAMES,
    Ordering,
    OrderingError,
    check_layers,
    load_ordering,
    make_ordering,
    module_paths,
    resolve_order,
)
from ..models.config import ModelConfig
from . import hub
from .base import LoadError, ModelSpec

XLORA_PATTERNS = ["*.json", "*.safetensors"]
_ADAPTER_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$"
)
# NOTE: LoRA options mistral.rs silently ignores; computing something else than the adapter was
# trained with is worse than refusing it. Value = the only accepted value (None: absent/empty).
_LORA_DEFAULTS = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": None,
    "alpha_pattern": None,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


@dataclass
class LoraAdapter:
    name: str
    r: int
    alpha: float
    target_modules: object  # as written in adapter_config.json (compared across adapters)
    weights: dict[str, tuple[Tensor, Tensor]]  # HF module path -> (A [r, in], B [out, r])

    @property
    def scale(self) -> float:
        return self.alpha / self.r if self.r else 1.0


def find_xlora_files(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(xlora_config.json, xlora_classifier.safetensors, {adapter name: folder}) found anywhere under root."""

    def first(name: str) -> Path | None:
        found = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
        return found[0] if found else None

    cfg, clf = first("xlora_config.json"), first("xlora_classifier.safetensors")
    if cfg is None or clf is None:
        what = "xlora_config.json" if cfg is None else "xlora_classifier.safetensors"
        hint = ""
        top = root / "adapter_config.json"
        if top.is_file() and "XLORA" in top.read_text():
            hint = " (this looks like a PEFT X-LoRA save, which keeps the classifier elsewhere; the xlora package's layout is needed)"
        raise LoadError(f"X-LoRA model {root} has no {what}{hint}")
    adapters: dict[str, Path] = {}
    for p in sorted(root.rglob("adapter_config.json")):
        # NOTE: adapters are grouped by their folder's name, whatever the depth (as mistral.rs does).
        name = p.parent.name
        if name in adapters and adapters[name] != p.parent:
            raise LoadError(
                f"X-LoRA model {root}: two adapter folders are named {name!r} ({adapters[name]}, {p.parent})"
            )
        adapters[name] = p.parent
    return cfg, clf, adapters


def read_adapter(folder: Path, name: str) -> LoraAdapter:
    from .weights import open_safetensors

    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"adapter {name}: {cfg_path} is not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoadError(f"adapter {name}: peft_type is {cfg['peft_type']!r}; X-LoRA experts must be LoRA adapters")
    for key, ok in _LORA_DEFAULTS.items():
        v = cfg.get(key)
        if v is not None and v != ok and not (ok is None and not v):
            raise LoadError(f"adapter {name}: {key}={json.dumps(v)} is not supported (only {json.dumps(ok)})")
    if not w_path.is_file():
        pickles = [p.name for p in folder.glob("adapter_model.*")]
        why = f"only {pickles[0]}, pickle weights are refused" if pickles else "no adapter_model.safetensors"
        raise LoadError(f"adapter {name}: {folder} has {why}")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    pairs: dict[str, dict[str, Tensor]] = {}
    with open_safetensors(w_path) as f:
        for key in f.keys():
            m = _ADAPTER_KEY.match(key)
            if m is None:
                what = (
                    "a bias"
                    if key.endswith(".bias")
                    else "an embedding or output head"
                    if ("embed" in key or "lm_head" in key)
                    else "unexpected"
                )
                raise LoadError(
                    f"adapter {name}: tensor {key} is {what}; X-LoRA adapters may hold only lora_A/lora_B "
                    f"of {', '.join(LEAF_NAMES)}"
                )
            module = f"model.layers.{m.group(1)}.{m.group(2)}"
            pairs.setdefault(module, {})[m.group(3)] = f.get_tensor(key)
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoadError(
                f"adapter {name}: {module} has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'}"
            )
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoadError(
                f"adapter {name}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"expected [r, in] and [out, r] with r={r}"
            )
        weights[module] = (a, b)
    if not weights:
        raise LoadError(f"adapter {name}: {w_path} holds no LoRA weights")
    return LoraAdapter(name, r, alpha, cfg.get("target_modules"), weights)


def adapter_targets(adapters: list[LoraAdapter]) -> list[str]:
    first = adapters[0]
    for ad in adapters[1:]:
        if _as_set(ad.target_modules) != _as_set(first.target_modules) or set(ad.weights) != set(first.weights):
            raise LoadError(
                f"adapters {first.name} and {ad.name} target different modules; all X-LoRA adapters must "
                "have the same target_modules"
            )
    return sorted({m.rsplit(".", 1)[1] for m in first.weights}, key=LEAF_NAMES.index)


def _as_set(t):
    return frozenset(t) if isinstance(t, (list, tuple, set)) else t


def read_checkpoint(spec: ModelSpec) -> tuple[XLoraConfig, Ordering | None, list[LoraAdapter], Path]:
    """(config, ordering file or None, adapters in class order, classifier file) of spec.xlora_model_id."""
    if not spec.xlora_model_id:
        raise LoadError("x-lora-mistral needs --xlora-model-id/-x (a directory or hub id with xlora_config.json)")
    root = hub.resolve(spec.xlora_model_id, None, patterns=XLORA_PATTERNS, what="X-LoRA model")
    if not root.is_dir():
        raise LoadError(f"X-LoRA model {spec.xlora_model_id} is a file; pass the directory holding xlora_config.json")
    cfg_path, clf_path, folders = find_xlora_files(root)
    try:
        cfg = XLoraConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
        ordering = load_ordering(spec.order) if spec.order else None
        order = resolve_order(ordering or Ordering(), cfg.adapters, list(folders), spec.order or str(cfg_path))
        cfg.check_adapters(len(order), str(cfg_path))
    except (XLoraConfigError, OrderingError) as e:
        raise LoadError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{cfg_path} is not valid JSON ({e})") from None
    return cfg, ordering, [read_adapter(folders[name], name) for name in order], clf_path


def wrapped_modules(
    cfg: XLoraConfig, ordering: Ordering | None, adapters: list[LoraAdapter], base: ModelConfig, order_source: str
) -> tuple[list[str], list[int]]:
    """The checkpoint against the base model's config: (HF module paths of the linears to wrap; the
    X-LoRA layer index of each, from the ordering)."""
    if cfg.hidden_size != base.hidden_size:
        raise LoadError(
            f"xlora_config.json: hidden_size is {cfg.hidden_size}, the base model's is {base.hidden_size}: "
            "the X-LoRA model was trained on another base model"
        )
    targets = adapter_targets(adapters)
    wrapped = module_paths(base.num_layers, targets)
    have = set(adapters[0].weights)
    if have != set(wrapped):
        odd = sorted(have ^ set(wrapped))[0]
        raise LoadError(
            f"adapter {adapters[0].name}: {'has no weights for' if odd in wrapped else 'has weights for'} "
            f"{odd}; the adapters must cover every layer of the {base.num_layers}-layer base model"
        )
    order = [ad.name for ad in adapters]
    try:
        index = check_layers(
            ordering or make_ordering(base.num_layers, order, targets), wrapped, base.num_layers, order_source
        )
    except OrderingError as e:
        raise LoadError(str(e)) from None
    return wrapped, index
