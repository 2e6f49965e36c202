"""X-LoRA on the decoder: a scaling pass, the classifier, then the real pass (spec §4).

The decoder is the plain `CausalLM` whose adapted linears were replaced by `XLoraLinear`s; all of
them read one `Scalings` object that this model sets before each pass. Caches are passed in:
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


class XLoraModel(nn.Module):
    def __init__(self, base: CausalLM, cfg: XLoraConfig, classifier: XLoraClassifier, stacks: list[AdapterStack],
                 ranks: list[int]):
        super().__init__()
        self.base, self.cfg, self.classifier = base, cfg, classifier
        self.n, self.L = len(ranks), len(stacks)
        self.scalings = Scalings()
        g = cfg.global_scaling_weight
        self.wrapped: list[XLoraLinear] = []
        for st in stacks:
            *path, leaf = st.module.split(".")
            owner = base.get_submodule(".".join(path))
            lin = XLoraLinear(getattr(owner, leaf), st.lora_a, st.lora_b * g, self.scalings,
                              row=st.index if cfg.layerwise_scalings else 0, index=st.index)
            setattr(owner, leaf, lin)
            self.wrapped.append(lin)
        # NOTE: adapter i owns ranks [sum r_<i, sum r_<=i) of the stacked A/B; scalings are expanded
        # to rank space once per pass with this index instead of per wrapped linear.
        dev = stacks[0].lora_a.device if stacks else None
        self.register_buffer("rank_index", torch.repeat_interleave(torch.arange(self.n), torch.tensor(ranks)).to(dev),
                             persistent=False)

    # ---- the two passes ------------------------------------------------------------------------
    def scaling_hidden(self, input_ids: Tensor, view: BatchView, cache) -> Tensor:
        """The scaling pass: final-norm hidden states [N, D] under the constant dummy scalings."""
        self.scalings.set_constant(self.cfg.scaling_pass_value)
        try:
            return self.base.hidden_states(input_ids, view, cache)
        finally:
            self.scalings.set_constant(0.0)  # NOTE: outside a pass the decoder is the base model

    def classify(self, h: Tensor) -> Tensor:
        """h: [N, D] -> the classifier's scalings [N, rows, n] (rows = L when layerwise, else 1)."""
        return self.classifier(h)

    def real_logits(self, input_ids: Tensor, view: BatchView, cache, scalings: Tensor) -> Tensor:
        """The real pass with the classifier's scalings [N, rows, n] -> float32 logits of view.logit_rows."""
        if self.cfg.top_k_lora is not None or self.cfg.enable_softmax_topk:
            # NOTE: top-k acts on the classifier's scalings only, the dummy ones stay constant (§4.4);
            # like PEFT, what is reported (get_latest_scalings) is the classifier's output before it.
            scalings = top_k_scalings(scalings, self.cfg.top_k_lora, self.cfg.enable_softmax_topk)
        self.scalings.set_rank(scalings.index_select(-1, self.rank_index))  # [N, rows, R]
        try:
            h = self.base.hidden_states(input_ids, view, cache)
        finally:
            self.scalings.set_constant(0.0)  # NOTE: drops the reference to this step's scalings
        return self.base.lm_head(h[view.logit_rows]).float()

    def forward(self, input_ids: Tensor, view: BatchView, cache, scaling_cache) -> tuple[Tensor, Tensor]:
        """One step with a cache per pass: (logits [S, V], scalings [N, rows, n])."""
        s = self.classify(self.scaling_hidden(input_ids, view, scaling_cache))
        return self.real_logits(input_ids, view, cache, s), s
