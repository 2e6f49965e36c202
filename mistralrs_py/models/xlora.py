"""X-LoRA on the decoder: a scaling pass, the classifier, then the real pass (spec §4).

The decoder is the plain `CausalLM` whose adapted linears were replaced by `XLoraLinear`s; each
pass gives them its scalings through the decoder's forward (`lora=`, a `Scalings` value): the
scaling pass a constant, the real pass the classifier's per-token scalings. Caches are passed in:
the scaling pass and the real pass must each have their own (spec §5), since the same position
has different keys and values in each.

Shapes: N tokens of the step, D hidden size, L wrapped linears, n adapters, R = sum of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..lora.classifier import XLoraClassifier, XLoraConfig, top_k_scalings
from ..lora.linear import Scalings, XLoraLinear
from .layers import BatchView
from .llama import CausalLM


@dataclass
class AdapterStack:
    """One wrapped linear's adapters, stacked: A [R, in]; B [out, R] with alpha_i/r_i already folded in."""

    module: str  # our module path, e.g. "layers.0.self_attn.q_proj"
    lora_a: Tensor
    lora_b: Tensor
    index: int  # X-LoRA layer index (from the ordering)


# NOTE: fused projections (llama.fuse_projections) and their parts, in output order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class XLoraModel(nn.Module):
    """The base decoder with its wrapped linears, and the classifier. Not called as a whole: the
    pipeline (pipeline/xlora.py) runs the passes, since it keeps per-sequence state between them.
    """

    def __init__(
        self,
        base: CausalLM,
        cfg: XLoraConfig,
        classifier: XLoraClassifier,
        stacks: list[AdapterStack],
        ranks: list[int],
    ):
        super().__init__()
        self.base, self.cfg, self.classifier = base, cfg, classifier
        self.n, self.L = len(ranks), len(stacks)
        # NOTE: the scaling pass's dummy scalings; 0 (the default) skips the adapters: the base model
        self.scaling_pass = Scalings.fixed(cfg.scaling_pass_value)
        self.wrapped: list[XLoraLinear] = []
        for owner, leaf, parts in _groups(base, stacks):
            self.wrapped.append(self._wrap(owner, leaf, parts))
        # NOTE: adapter i owns ranks [sum r_<i, sum r_<=i) of the stacked A/B; scalings are expanded
        # to rank space once per pass with this index instead of per wrapped linear.
        dev = stacks[0].lora_a.device if stacks else None
        self.lora_dtype = stacks[0].lora_a.dtype if stacks else classifier.last.weight.dtype
        self.register_buffer(
            "rank_index", torch.repeat_interleave(torch.arange(self.n), torch.tensor(ranks)).to(dev), persistent=False
        )

    def _wrap(self, owner: nn.Module, leaf: str, parts: list[tuple[int, int, AdapterStack | None]]) -> XLoraLinear:
        """parts: (row offset, rows, stack or None when not adapted) covering the module's output."""
        g = self.cfg.global_scaling_weight
        adapted = [(off, st) for off, _, st in parts if st is not None]
        a = torch.cat([st.lora_a for _, st in adapted])
        # NOTE: B^T compact ([R, out]): each adapted part's B^T in its own output columns (lora/linear.py)
        out = sum(rows for _, rows, _ in parts)
        bt = a.new_zeros(adapted[0][1].lora_a.shape[0], out)
        for off, st in adapted:
            bt[:, off : off + st.lora_b.shape[0]] = st.lora_b.t() * g
        spans = [(off, off + st.lora_b.shape[0]) for off, st in adapted]
        idx = [st.index for _, st in adapted]
        lin = XLoraLinear(
            getattr(owner, leaf),
            a,
            bt,
            rows=idx if self.cfg.layerwise_scalings else [0] * len(idx),
            indices=idx,
            spans=spans,
        )
        setattr(owner, leaf, lin)
        return lin

    # ---- the two passes ------------------------------------------------------------------------
    def scaling_hidden(self, input_ids: Tensor, view: BatchView, cache) -> Tensor:
        """The scaling pass: final-norm hidden states [N, D] under the constant dummy scalings; the
        classifier turns them into scalings [N, rows, n] (rows = L when layerwise, else 1)."""
        return self.base.hidden_states(input_ids, view, cache, self.scaling_pass)

    def real_logits(self, input_ids: Tensor, view: BatchView, cache, scalings: Tensor) -> Tensor:
        """The real pass with the classifier's scalings [N, rows, n] -> float32 logits of view.logit_rows."""
        if self.cfg.top_k_lora is not None or self.cfg.enable_softmax_topk:
            # NOTE: top-k acts on the classifier's scalings only, the dummy ones stay constant (§4.4);
            # like PEFT, what is reported (get_latest_scalings) is the classifier's output before it.
            scalings = top_k_scalings(scalings, self.cfg.top_k_lora, self.cfg.enable_softmax_topk)
        lora = Scalings.per_token(scalings.to(self.lora_dtype).index_select(-1, self.rank_index))  # [N, rows, R]
        return self.base(input_ids, view, cache, lora)


def _groups(base: CausalLM, stacks: list[AdapterStack]):
    """(owner module, attribute, parts) per module to wrap; a fused projection gathers its parts."""
    cfg = base.cfg
    size = {
        "q_proj": cfg.num_heads * cfg.head_dim,
        "k_proj": cfg.kv_dim,
        "v_proj": cfg.kv_dim,
        "gate_proj": cfg.intermediate_size,
        "up_proj": cfg.intermediate_size,
    }
    fused: dict[tuple[str, str], dict[str, AdapterStack]] = {}
    for st in stacks:
        owner_path, leaf = st.module.rsplit(".", 1)
        owner = base.get_submodule(owner_path)
        if isinstance(getattr(owner, leaf, None), nn.Module):
            yield owner, leaf, [(0, st.lora_b.shape[0], st)]
            continue
        name = next(f for f, members in FUSED_PARTS.items() if leaf in members)
        fused.setdefault((owner_path, name), {})[leaf] = st
    for (owner_path, name), by_leaf in fused.items():
        parts, off = [], 0
        for leaf in FUSED_PARTS[name]:
            parts.append((off, size[leaf], by_leaf.get(leaf)))
            off += size[leaf]
        yield base.get_submodule(owner_path), name, parts
