"""Loader and pipeline for `x-lora-mistral`: a base model (HF safetensors, the embedded default or a
GGUF kept quantized) plus an X-LoRA checkpoint in the xlora package's layout:

    <xlora>/xlora_config.json  <xlora>/xlora_classifier.safetensors
    <xlora>/<adapter name>/adapter_config.json + adapter_model.safetensors   (any depth)

Everything X-LoRA-specific at run time lives in `XLoraPipeline`: the engine only sees
`cache_streams` (2: real pass in stream 0, scaling pass in stream 1; 1 with --no-xlora-kv-cache),
`forward`, and the per-slot hooks `begin_slot` (a new sequence: its scaling state starts afresh) and
`end_slot` (which reports the sequence's mean scalings per adapter).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..lora.classifier import XLoraClassifier, XLoraConfig, XLoraConfigError
from ..lora.ordering import LEAF_NAMES, Ordering, OrderingError, check_layers, load_ordering, make_ordering, module_paths, resolve_order
from ..models.layers import BatchView, Linear, PrefillSegment, prefill_mask
from ..models.xlora import AdapterStack, XLoraModel
from . import hub
from .base import LoadError, ModelKind, ModelSpec, Pipeline, register
from .weights import memory_bytes

XLORA_PATTERNS = ["*.json", "*.safetensors"]
_ADAPTER_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                          r"\.lora_([AB])(?:\.[^.]+)?\.weight$")
# NOTE: LoRA options mistral.rs silently ignores; computing something else than the adapter was
# trained with is worse than refusing it. Value = the only accepted value (None: absent/empty).
_LORA_DEFAULTS = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                  "rank_pattern": None, "alpha_pattern": None, "modules_to_save": None, "layers_to_transform": None,
                  "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


# ---- the checkpoint -------------------------------------------------------------------------------
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
            raise LoadError(f"X-LoRA model {root}: two adapter folders are named {name!r} ({adapters[name]}, {p.parent})")
        adapters[name] = p.parent
    return cfg, clf, adapters


def read_adapter(folder: Path, name: str) -> LoraAdapter:
    from safetensors import safe_open

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
    with safe_open(str(w_path), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _ADAPTER_KEY.match(key)
            if m is None:
                what = "a bias" if key.endswith(".bias") else "an embedding or output head" if ("embed" in key or "lm_head" in key) else "unexpected"
                raise LoadError(f"adapter {name}: tensor {key} is {what}; X-LoRA adapters may hold only lora_A/lora_B "
                                f"of {', '.join(LEAF_NAMES)}")
            module = f"model.layers.{m.group(1)}.{m.group(2)}"
            pairs.setdefault(module, {})[m.group(3)] = f.get_tensor(key)
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoadError(f"adapter {name}: {module} has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoadError(f"adapter {name}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                            f"expected [r, in] and [out, r] with r={r}")
        weights[module] = (a, b)
    if not weights:
        raise LoadError(f"adapter {name}: {w_path} holds no LoRA weights")
    return LoraAdapter(name, r, alpha, cfg.get("target_modules"), weights)


def _targets_of(adapters: list[LoraAdapter]) -> list[str]:
    first = adapters[0]
    for ad in adapters[1:]:
        if _as_set(ad.target_modules) != _as_set(first.target_modules) or set(ad.weights) != set(first.weights):
            raise LoadError(f"adapters {first.name} and {ad.name} target different modules; all X-LoRA adapters must "
                            "have the same target_modules")
    return sorted({m.rsplit(".", 1)[1] for m in first.weights}, key=LEAF_NAMES.index)


def _as_set(t):
    return frozenset(t) if isinstance(t, (list, tuple, set)) else t


# ---- loading --------------------------------------------------------------------------------------
@register(ModelKind.XLORA)
def load_xlora(spec: ModelSpec, progress=None) -> "XLoraPipeline":
    # NOTE: the X-LoRA files are read and checked first, so a wrong ordering or adapter fails in a
    # second instead of after the base model's load.
    cfg, ordering, adapters, clf_path = read_checkpoint(spec)
    base = _load_base(spec, progress)
    mc, order = base.config, [ad.name for ad in adapters]
    if cfg.hidden_size != mc.hidden_size:
        raise LoadError(f"xlora_config.json: hidden_size is {cfg.hidden_size}, the base model's is {mc.hidden_size}: "
                        "the X-LoRA model was trained on another base model")
    targets = _targets_of(adapters)
    wrapped = module_paths(mc.num_layers, targets)
    have = set(adapters[0].weights)
    if have != set(wrapped):
        odd = sorted(have ^ set(wrapped))[0]
        raise LoadError(f"adapter {adapters[0].name}: {'has no weights for' if odd in wrapped else 'has weights for'} "
                        f"{odd}; the adapters must cover every layer of the {mc.num_layers}-layer base model")
    try:
        index = check_layers(ordering or make_ordering(mc.num_layers, order, targets), wrapped, mc.num_layers,
                             spec.order or "ordering")
    except OrderingError as e:
        raise LoadError(str(e)) from None
    stacks = _stacks(base, adapters, wrapped, index)
    from safetensors.torch import load_file

    classifier = XLoraClassifier(cfg, len(order), len(wrapped), device=base.device, dtype=base.dtype, linear=Linear)
    try:
        classifier.load(load_file(str(clf_path)), str(clf_path))
    except XLoraConfigError as e:
        raise LoadError(str(e)) from None
    from ..models.fusion import fuse_linears
    from ..models.llama import fuse_projections

    # NOTE: q/k/v and gate/up fused as for the plain model; a fused projection's adapters are fused too.
    fused = fuse_projections(base.model, fuse_linears)
    xmodel = XLoraModel(base.model, cfg, classifier, stacks, [ad.r for ad in adapters]).eval()
    mode = "no X-LoRA KV cache" if spec.no_xlora_kv_cache else "dual KV cache"
    summary = dict(base.summary)
    summary["format"] = (f"{summary.get('format', '?')} + X-LoRA {len(order)} adapters ({', '.join(order)}) on "
                         f"{len(wrapped)} linears, {mode}")
    summary["weights_bytes"] = memory_bytes(xmodel)
    summary["fused"] = fused
    return XLoraPipeline(name=base.name, config=mc, model=base.model, tokenizer=base.tokenizer, dtype=base.dtype,
                         device=base.device, max_model_len=base.max_model_len, summary=summary, xlora=xmodel,
                         adapter_names=order, no_kv_cache=spec.no_xlora_kv_cache,
                         tgt_non_granular_index=spec.tgt_non_granular_index)


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


def _stacks(base: Pipeline, adapters: list[LoraAdapter], wrapped: list[str], index: list[int]) -> list[AdapterStack]:
    """Per wrapped module, every adapter's A and B stacked (alpha/r folded into B)."""
    # NOTE: on the CPU, bf16/f16 matmuls as small as a LoRA's cost 3-6x float32 ones (measured with
    # torch 2.13: 31 us vs 5 us for [1, 576] x [576, 72]); the adapters are a few MB, so keep them in
    # float32 there. On GPUs they run in the model's dtype.
    lora_dtype = torch.float32 if base.device.type == "cpu" else base.dtype
    stacks = []
    for module, idx in zip(wrapped, index):
        ours = module.removeprefix("model.")
        lin = base.model.get_submodule(ours)
        a = torch.cat([ad.weights[module][0].float() for ad in adapters])
        b = torch.cat([ad.weights[module][1].float() * ad.scale for ad in adapters], dim=1)
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            raise LoadError(f"adapter weights of {module} are [{b.shape[0]} x {a.shape[1]}], the base layer is "
                            f"[{lin.out_features} x {lin.in_features}]: trained on another base model")
        stacks.append(AdapterStack(ours, a.to(base.device, lora_dtype), b.to(base.device, lora_dtype), idx))
    return stacks


def _load_base(spec: ModelSpec, progress) -> Pipeline:
    if spec.quantized_model_id or spec.quantized_filename:
        if spec.model_id:
            raise LoadError("give the base model either with --model-id or with --quantized-model-id/--quantized-filename, not both")
        from .gguf import load_quantized

        return load_quantized(replace(spec, kind=ModelKind.GGUF), progress)
    from .hf import load_plain

    return load_plain(replace(spec, kind=ModelKind.PLAIN), progress)


def num_layers_of(model_id: str | None, revision: str | None = None) -> int:
    """Decoder layers of a model dir / hub id / .gguf file / the embedded default (for `mistralrs ordering`)."""
    from .hf import read_config

    path = hub.embedded_gguf_path() if model_id is None else hub.resolve(model_id, revision, patterns=["config.json"])
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            path = found[0]
    if path.is_file():
        from .gguf import open_gguf, read_fields

        fields = read_fields(open_gguf(path))
        arch = fields.get("general.architecture")
        if f"{arch}.block_count" not in fields:
            raise LoadError(f"{path}: GGUF metadata has no {arch}.block_count")
        return int(fields[f"{arch}.block_count"])
    return read_config(path).num_layers


# ---- the pipeline ---------------------------------------------------------------------------------
class _Scratch:
    """K/V for one sequence's uncached scaling pass (--no-xlora-kv-cache): [1, Hk, P, hd] per layer."""

    def __init__(self, layers: int, heads: int, head_dim: int, length: int, dtype, device):
        self.k = [torch.zeros(1, heads, length, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.length = length


@dataclass
class XLoraPipeline(Pipeline):
    xlora: XLoraModel | None = None
    adapter_names: list[str] = field(default_factory=list)
    no_kv_cache: bool = False
    tgt_non_granular_index: int | None = None

    def __post_init__(self) -> None:
        self.cache_streams = 1 if self.no_kv_cache else 2
        self.shares_prefixes = False  # per-slot token records and scaling state
        self.graphable = False
        self.last_scalings: Tensor | None = None  # [N, rows, n] of the latest step (reports, tests)
        self._pool = lambda: None  # weak reference to the pool the per-slot state belongs to

    def _state_for(self, pool) -> None:
        """Per-slot state sized by the engine's pool, (re)made when a new pool is seen.

        NOTE: a weak reference, so an engine that is dropped frees its (large) pool at once."""
        if self._pool() is pool:
            return
        self._pool = weakref.ref(pool)
        slots, n, dev = pool.num_slots, len(self.adapter_names), self.device
        self._sums = torch.zeros(slots, n, dtype=torch.float32, device=dev)  # sum of per-token scalings
        self._counts = torch.zeros(slots, dtype=torch.float32, device=dev)
        if self.no_kv_cache:
            # NOTE: the token ids each slot has seen, written where the cache would write K/V, so the
            # scaling pass can rerun over the whole sequence without a cache of its own.
            self._ids = torch.zeros(slots, self.max_model_len, dtype=torch.long, device=dev)
            self._arange = torch.arange(self.max_model_len, device=dev)
            self._scratch: _Scratch | None = None
        if self.tgt_non_granular_index is not None:
            self._steps = [0] * slots  # decode steps since the prompt
            self._frozen_set = [False] * slots
            self._frozen = torch.zeros(slots, self.xlora.classifier.rows, n, dtype=self.dtype, device=dev)

    def network(self) -> nn.Module:
        return self.xlora  # NOTE: the base model with its wrapped linears, and the classifier

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, view: BatchView, cache) -> Tensor:
        self._state_for(cache)
        xl = self.xlora
        if self.no_kv_cache:
            self._ids[view.row_slots, view.positions] = input_ids
        plan = self._non_granular_plan(view) if self.tgt_non_granular_index is not None else None
        if plan is not None and plan.skip:
            s = self._frozen[view.decode_slots]  # every row is a frozen decode row: no scaling pass
        else:
            if self.no_kv_cache:
                h = self._uncached_scaling_hidden(view)
            else:
                if len(cache.streams) < 2:
                    raise RuntimeError("X-LoRA needs a KV cache pool with 2 streams (Pipeline.cache_streams)")
                h = xl.scaling_hidden(input_ids, view, cache.streams[1])
            s = xl.classifier(h)  # [N, rows, n]
            if plan is not None and plan.frozen_rows:
                s[plan.frozen_rows] = self._frozen[plan.frozen_slots]
        if plan is not None and plan.freeze_rows:
            self._frozen[plan.freeze_slots] = s[plan.freeze_rows]
        logits = xl.real_logits(input_ids, view, cache, s)
        # NOTE: per-slot running sums on the device; read once, when the sequence ends.
        self._sums.index_add_(0, view.row_slots, s.float().mean(1))
        self._counts.index_add_(0, view.row_slots, torch.ones_like(view.row_slots, dtype=torch.float32))
        self.last_scalings = s
        return logits

    # ---- per-slot hooks (the engine's) -------------------------------------------------------
    @torch.inference_mode()  # NOTE: the per-slot state was made inside forward's inference mode
    def begin_slot(self, slot: int) -> None:
        if self._has_state(slot):
            self._reset(slot)

    @torch.inference_mode()
    def end_slot(self, slot: int) -> dict | None:
        if not self._has_state(slot):
            return None
        count = float(self._counts[slot])
        means = (self._sums[slot] / max(count, 1.0)).tolist()
        self._reset(slot)
        return {"xlora_scalings": dict(zip(self.adapter_names, means))} if count else None

    def _has_state(self, slot: int) -> bool:
        """NOTE: the state is made (zeroed) when forward first sees a pool; before that, or after the
        pool is gone, a slot has nothing to reset or report."""
        return self._pool() is not None and slot < self._counts.shape[0]

    def _reset(self, slot: int) -> None:
        self._sums[slot].zero_()
        self._counts[slot] = 0
        if self.tgt_non_granular_index is not None:
            self._steps[slot], self._frozen_set[slot] = 0, False

    # ---- --no-xlora-kv-cache ------------------------------------------------------------------
    def _uncached_scaling_hidden(self, view: BatchView) -> Tensor:
        """Scaling-pass hidden states [N, D] of the step's rows, recomputed over each whole sequence."""
        nd = view.num_decode
        seqs: list[tuple[int, int, int, int]] = []  # (slot, first row in the step, rows, sequence length)
        if nd:
            for r, (s, p) in enumerate(zip(view.decode_slots.tolist(), view.positions[:nd].tolist())):
                seqs.append((s, r, 1, p + 1))
        for seg in view.prefills:
            n = seg.end_row - seg.start_row
            seqs.append((seg.slot, seg.start_row, n, seg.start_pos + n))
        c = self.config
        out = torch.empty(view.num_tokens, c.hidden_size, dtype=self.dtype, device=self.device)
        longest = max(end for *_, end in seqs)
        if self._scratch is None or self._scratch.length < longest:
            size = min(self.max_model_len, -(-longest // 256) * 256)
            self._scratch = None  # NOTE: free the old buffers before allocating the larger ones
            self._scratch = _Scratch(c.num_layers, c.num_kv_heads, c.head_dim, size, self.dtype, self.device)
        # NOTE: one sequence at a time, so the scratch cache holds one sequence (this mode exists to
        # save cache memory); each is a fresh prompt at position 0 in scratch slot 0.
        for slot, row, n, end in seqs:
            pos = self._arange[:end]
            v = BatchView(positions=pos, row_slots=torch.zeros_like(pos), logit_rows=pos[:0],
                          prefills=[PrefillSegment(0, end, 0, 0, prefill_mask(0, end, c.sliding_window, self.device))])
            h = self.xlora.scaling_hidden(self._ids[slot, :end], v, self._scratch)
            out[row : row + n] = h[end - n :]
        return out

    # ---- --tgt-non-granular-index -------------------------------------------------------------
    def _non_granular_plan(self, view: BatchView) -> "_Plan":
        """Which rows reuse their sequence's frozen scalings and which rows freeze them.

        NOTE: as mistral.rs, per sequence: decode step k (k = 1, 2, ...) computes fresh scalings up
        to k = tgt and freezes those of step tgt; later steps reuse them and skip the scaling pass
        (skipped for the whole step only when every row is frozen). tgt = 0 freezes the last prompt
        token's scalings. Unlike mistral.rs (which forces --max-seqs 1), the state is per slot."""
        tgt, plan = self.tgt_non_granular_index, _Plan()
        for seg in view.prefills:
            if tgt == 0:
                plan.freeze_rows.append(seg.end_row - 1)
                plan.freeze_slots.append(seg.slot)
        nd = view.num_decode
        for r, s in enumerate(view.decode_slots.tolist() if nd else []):
            self._steps[s] += 1
            if self._frozen_set[s]:
                plan.frozen_rows.append(r)
                plan.frozen_slots.append(s)
            elif self._steps[s] == tgt:
                plan.freeze_rows.append(r)
                plan.freeze_slots.append(s)
        for s in plan.freeze_slots:
            self._frozen_set[s] = True
        plan.skip = bool(nd) and not view.prefills and len(plan.frozen_rows) == nd
        return plan


@dataclass
class _Plan:
    skip: bool = False
    frozen_rows: list[int] = field(default_factory=list)
    frozen_slots: list[int] = field(default_factory=list)
    freeze_rows: list[int] = field(default_factory=list)
    freeze_slots: list[int] = field(default_factory=list)


# ---- benchmarking -----------------------------------------------------------------------------------
def bench_pipelines(dtype: str = "auto", device: str = "auto", quantized: bool = False,
                    no_xlora_kv_cache: bool = False) -> tuple[XLoraPipeline, Pipeline]:
    """(X-LoRA pipeline, the same base without adapters) on the embedded SmolLM2, for `make bench`.

    The X-LoRA side is the demo checkpoint (lora/demo.py: 3 random rank-8 adapters on all seven
    projections, layerwise 2-layer classifier), built in a temporary directory. quantized=True puts
    both on the GGUF base kept quantized (as `gguf-mistral`), else it is dequantized (as `mistral`)."""
    import tempfile

    from ..lora.demo import build_demo
    from .base import load_pipeline

    base_spec = ModelSpec(ModelKind.GGUF if quantized else ModelKind.PLAIN, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        out = build_demo(Path(tmp) / "xlora-demo")
        spec = replace(base_spec, kind=ModelKind.XLORA, xlora_model_id=str(out), order=str(out / "ordering.json"),
                       no_xlora_kv_cache=no_xlora_kv_cache,
                       quantized_filename=str(hub.embedded_gguf_path()) if quantized else None)
        xl = load_xlora(spec)
    return xl, load_pipeline(base_spec)
