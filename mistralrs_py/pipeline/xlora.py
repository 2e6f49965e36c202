"""Loader and pipeline for `x-lora-mistral`: a base model (HF safetensors, the embedded default or a
GGUF kept quantized) plus an X-LoRA checkpoint in the xlora package's layout (xlora_checkpoint.py
reads and checks it).

Everything X-LoRA-specific at run time lives in `XLoraPipeline`: the engine only sees
`cache_streams` (2: real pass in stream 0, scaling pass in stream 1; 1 with --no-xlora-kv-cache),
`forward`, and the per-slot hooks `begin_slot` (a new sequence: its scaling state starts afresh) and
`end_slot` (which reports the sequence's mean scalings per adapter).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..lora.classifier import XLoraClassifier, XLoraConfigError
from ..models.layers import BatchView, Linear, PrefillSegment, prefill_mask
from ..models.xlora import AdapterStack, XLoraModel
from . import hub
from .base import LoadError, ModelKind, ModelSpec, Pipeline
from .weights import memory_bytes
from .xlora_checkpoint import LoraAdapter, read_checkpoint, wrapped_modules


# ---- loading --------------------------------------------------------------------------------------
def load_xlora(spec: ModelSpec, progress=None) -> "XLoraPipeline":
    # NOTE: the X-LoRA files are read and checked first, so a wrong ordering or adapter fails in a
    # second instead of after the base model's load.
    cfg, ordering, adapters, clf_path = read_checkpoint(spec)
    base = _load_base(spec, progress)
    if base.config.num_experts:
        raise LoadError(
            f"X-LoRA on a mixture-of-experts base ({base.config.model_type}) is not supported: its experts' "
            "projections have no place in the ordering; use a dense base model"
        )
    mc, order = base.config, [ad.name for ad in adapters]
    wrapped, index = wrapped_modules(cfg, ordering, adapters, mc, spec.order or "ordering")
    stacks = _stacks(base, adapters, wrapped, index)
    from .weights import open_safetensors

    classifier = XLoraClassifier(cfg, len(order), len(wrapped), device=base.device, dtype=base.dtype, linear=Linear)
    try:
        with open_safetensors(clf_path) as f:
            classifier.load({k: f.get_tensor(k) for k in f.keys()}, str(clf_path))
    except XLoraConfigError as e:
        raise LoadError(str(e)) from None
    from ..models.fusion import fuse_linears
    from ..models.llama import fuse_projections

    # NOTE: q/k/v and gate/up fused as for the plain model; a fused projection's adapters are fused too.
    fused = fuse_projections(base.model, fuse_linears)
    xmodel = XLoraModel(base.model, cfg, classifier, stacks, [ad.r for ad in adapters]).eval()
    mode = "no X-LoRA KV cache" if spec.no_xlora_kv_cache else "dual KV cache"
    summary = dict(base.summary)
    summary["format"] = (
        f"{summary.get('format', '?')} + X-LoRA {len(order)} adapters ({', '.join(order)}) on "
        f"{len(wrapped)} linears, {mode}"
    )
    summary["weights_bytes"] = memory_bytes(xmodel)
    summary["fused"] = fused
    return XLoraPipeline(
        name=base.name,
        config=mc,
        model=base.model,
        tokenizer=base.tokenizer,
        dtype=base.dtype,
        device=base.device,
        max_model_len=base.max_model_len,
        summary=summary,
        xlora=xmodel,
        adapter_names=order,
        no_kv_cache=spec.no_xlora_kv_cache,
        tgt_non_granular_index=spec.tgt_non_granular_index,
    )


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
            raise LoadError(
                f"adapter weights of {module} are [{b.shape[0]} x {a.shape[1]}], the base layer is "
                f"[{lin.out_features} x {lin.in_features}]: trained on another base model"
            )
        stacks.append(AdapterStack(ours, a.to(base.device, lora_dtype), b.to(base.device, lora_dtype), idx))
    return stacks


def _load_base(spec: ModelSpec, progress) -> Pipeline:
    if spec.quantized_model_id or spec.quantized_filename:
        if spec.model_id:
            raise LoadError(
                "give the base model either with --model-id or with --quantized-model-id/--quantized-filename, not both"
            )
        if spec.isq:
            raise LoadError(
                "--isq quantizes a safetensors base as it loads; this base is a GGUF file, quantized already"
            )
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
        from .gguf import open_gguf
        from .gguf_tokenizer import read_gguf_fields

        fields = read_gguf_fields(open_gguf(path))
        arch = fields.get("general.architecture")
        if f"{arch}.block_count" not in fields:
            raise LoadError(f"{path}: GGUF metadata has no {arch}.block_count")
        return int(fields[f"{arch}.block_count"])
    return read_config(path).num_layers


# ---- the pipeline ---------------------------------------------------------------------------------
class _Scratch:
    """K/V for one sequence's uncached scaling pass (--no-xlora-kv-cache), paged as the engine's
    cache: [blocks, Hk, bs, hd] per layer, the sequence in blocks 0, 1, 2, ..."""

    block_size = 16

    def __init__(self, layers: int, heads: int, head_dim: int, length: int, dtype, device):
        blocks = -(-length // self.block_size)
        dims = (blocks, heads, self.block_size, head_dim)
        self.k = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.length = length
        self.table = torch.arange(blocks, device=device)


@dataclass
class XLoraPipeline(Pipeline):
    xlora: XLoraModel | None = None
    adapter_names: list[str] = field(default_factory=list)
    no_kv_cache: bool = False
    tgt_non_granular_index: int | None = None

    def __post_init__(self) -> None:
        self.cache_streams = 1 if self.no_kv_cache else 2
        self.caches_decoded_blocks = self.tgt_non_granular_index is None
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
        # NOTE: the same per cache block, so that a sequence that starts from cached blocks (prefix
        # cache, n > 1) reports the scalings of the tokens it did not compute again
        self._block_sums = torch.zeros(pool.num_blocks + 1, n, dtype=torch.float32, device=dev)
        self._block_counts = torch.zeros(pool.num_blocks + 1, dtype=torch.float32, device=dev)
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
        means, ones = s.float().mean(1), torch.ones_like(view.row_slots, dtype=torch.float32)
        self._sums.index_add_(0, view.row_slots, means)
        self._counts.index_add_(0, view.row_slots, ones)
        self._block_sums.index_add_(0, view.write_blocks, means)
        self._block_counts.index_add_(0, view.write_blocks, ones)
        self.last_scalings = s
        return logits

    # ---- per-slot hooks (the engine's) -------------------------------------------------------
    @torch.inference_mode()  # NOTE: the per-slot state was made inside forward's inference mode
    def begin_slot(self, slot: int, tokens: list[int] | None = None, cached_blocks: list[int] = ()) -> None:
        if self._has_state(slot):
            self._reset(slot)
            if cached_blocks:
                idx = torch.tensor(cached_blocks, dtype=torch.long, device=self.device)
                self._sums[slot] += self._block_sums[idx].sum(0)
                self._counts[slot] += self._block_counts[idx].sum()
            if self.no_kv_cache and tokens:
                # NOTE: a prefix-cache hit is not recomputed: its tokens are recorded here
                self._ids[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def reset_blocks(self, blocks: list[int]) -> None:
        if blocks and self._pool() is not None:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
            self._block_sums.index_fill_(0, idx, 0)
            self._block_counts.index_fill_(0, idx, 0)

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
            pos, bs = self._arange[:end], self._scratch.block_size
            mask = prefill_mask(0, end, c.sliding_window, self.device)
            v = BatchView(
                positions=pos,
                row_slots=torch.zeros_like(pos),
                logit_rows=pos[:0],
                write_blocks=pos // bs,
                write_offsets=pos % bs,
                block_size=bs,
                prefills=[PrefillSegment(0, end, 0, 0, mask, self._scratch.table[: -(-end // bs)])],
            )
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
