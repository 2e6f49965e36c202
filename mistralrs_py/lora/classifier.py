"""The X-LoRA config and classifier (scaling head): final-norm hidden state -> adapter scalings.

Shapes: N tokens of the step, H hidden size, L wrapped linears, n adapters.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class XLoraConfigError(ValueError):
    """A bad xlora_config.json or classifier file; str() is one line."""


@dataclass
class XLoraConfig:
    """xlora_config.json with the defaults of the spec (§2.1); unknown keys are ignored."""

    hidden_size: int
    adapters: list[str] | None = None  # names in training order (a dict's keys, or a list)
    layerwise_scalings: bool = False
    enable_relu_and_dropout: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2  # identity at inference
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    scaling_pass_value: float = 0.0
    use_trainable_adapters: bool = False
    use_bias: bool = True
    global_scaling_weight: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False

    @classmethod
    def from_dict(cls, d: dict, source: str = "xlora_config.json") -> "XLoraConfig":
        if not isinstance(d, dict):
            raise XLoraConfigError(f"{source}: expected a JSON object")
        if "hidden_size" not in d:
            raise XLoraConfigError(f"{source}: `hidden_size` is required (the base model's hidden size)")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        adapters = kw.get("adapters")
        if isinstance(adapters, dict):
            kw["adapters"] = list(adapters)
        elif adapters is not None and not (isinstance(adapters, list) and all(isinstance(a, str) for a in adapters)):
            raise XLoraConfigError(f"{source}: `adapters` must be a mapping name -> path or a list of names")
        if "xlora_size" not in d and int(d.get("xlora_depth", 1)) > 1:
            # NOTE: mistral.rs's default is 1 (a bug), the xlora package's and PEFT's 2048.
            warnings.warn(f"{source}: no `xlora_size`; assuming 2048 (PEFT's default)", stacklevel=2)
        if kw.get("scaling_pass_value", 0.0) is None:
            n = len(kw.get("adapters") or [])
            if not n:
                raise XLoraConfigError(f"{source}: `scaling_pass_value` null means 1/n but no adapters are listed")
            kw["scaling_pass_value"] = 1.0 / n
        try:
            cfg = cls(**kw)
            cfg.hidden_size, cfg.xlora_depth, cfg.xlora_size = (
                int(cfg.hidden_size),
                int(cfg.xlora_depth),
                int(cfg.xlora_size),
            )
            for name in ("xlora_dropout_p", "softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
                setattr(cfg, name, float(getattr(cfg, name)))
            if cfg.top_k_lora is not None:
                cfg.top_k_lora = int(cfg.top_k_lora)
        except (TypeError, ValueError) as e:
            raise XLoraConfigError(f"{source}: {e}") from None
        if cfg.xlora_depth < 1:
            raise XLoraConfigError(f"{source}: `xlora_depth` must be at least 1, got {cfg.xlora_depth}")
        if cfg.softmax_temperature <= 0 and cfg.enable_softmax:
            raise XLoraConfigError(f"{source}: `softmax_temperature` must be positive")
        if cfg.enable_softmax_topk and cfg.enable_softmax:
            warnings.warn(
                f"{source}: enable_softmax_topk together with enable_softmax re-normalises softmax outputs twice",
                stacklevel=2,
            )
        return cfg

    def check_adapters(self, n: int, source: str = "xlora_config.json") -> None:
        if self.top_k_lora is not None and not 1 <= self.top_k_lora <= n:
            raise XLoraConfigError(f"{source}: `top_k_lora` is {self.top_k_lora}, but there are {n} adapters")


class XLoraClassifier(nn.Module):
    """`inner` Linears (ReLU after each when enabled; dropout is the identity) then `last`.

    forward(h [N, H]) -> scalings [N, L, n] when layerwise, else [N, 1, n] (the same row for
    every wrapped linear; broadcasting stands in for mistral.rs's expand).

    `linear`: the nn.Linear class to build with (the model's, whose decode rows run our CPU kernel:
    torch's bf16 CPU matmul takes ~30 us for each of these tiny layers, ours ~6)."""

    def __init__(
        self,
        cfg: XLoraConfig,
        n_adapters: int,
        n_layers: int,
        device=None,
        dtype=None,
        linear: type[nn.Linear] = nn.Linear,
    ):
        super().__init__()
        self.cfg, self.n, self.L = cfg, n_adapters, n_layers
        self.rows = n_layers if cfg.layerwise_scalings else 1
        dims = [cfg.hidden_size] + [cfg.xlora_size] * (cfg.xlora_depth - 1)
        kw = dict(bias=cfg.use_bias, device=device, dtype=dtype)
        self.inner = nn.ModuleList(linear(a, b, **kw) for a, b in zip(dims[:-1], dims[1:]))
        self.last = linear(dims[-1], self.rows * n_adapters, **kw)

    def logits(self, h: Tensor) -> Tensor:
        # h: [N, H] -> [N, rows, n]; flat index of the last layer = layer * n + adapter
        for lin in self.inner:
            h = lin(h)
            if self.cfg.enable_relu_and_dropout:
                h = F.relu(h)
        return self.last(h).view(h.shape[0], self.rows, self.n)

    def forward(self, h: Tensor) -> Tensor:
        z = self.logits(h)
        if self.cfg.enable_softmax:
            t = self.cfg.softmax_temperature
            z = torch.softmax(z if t == 1.0 else z / t, dim=-1)
        return z

    def load(self, tensors: dict[str, Tensor], source: str = "xlora_classifier.safetensors") -> None:
        """Top-level tensors `inner.{i}.weight/bias` and `last.weight/bias`.

        NOTE: the xlora package keeps ReLU/Dropout in the same ModuleList, so its Linears may be
        inner.0, inner.3, ...: the inner Linears are taken in increasing index order."""
        inner_idx = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"^inner\.(\d+)\.weight$", k))})
        want_inner = len(self.inner)
        if len(inner_idx) != want_inner:
            raise XLoraConfigError(
                f"{source}: has {len(inner_idx)} inner Linear layers, xlora_depth="
                f"{self.cfg.xlora_depth} implies {want_inner}"
            )
        names = {f"inner.{i}": f"inner.{j}" for i, j in zip(inner_idx, range(want_inner))}
        names["last"] = "last"
        expected = {n for n, _ in self.named_parameters()}
        got: set[str] = set()
        for theirs, ours in names.items():
            for part in ("weight", "bias"):
                key = f"{theirs}.{part}"
                if key not in tensors:
                    continue
                param = self.get_parameter(f"{ours}.{part}") if f"{ours}.{part}" in expected else None
                if param is None:
                    raise XLoraConfigError(f"{source}: has {key} but use_bias is false")
                t = tensors[key]
                if tuple(t.shape) != tuple(param.shape):
                    hint = ""
                    if ours == "last" and part == "weight":
                        hint = (
                            f" ({self.rows} x {self.n} adapters: layerwise_scalings="
                            f"{str(self.cfg.layerwise_scalings).lower()}, {self.L} wrapped linears)"
                        )
                    raise XLoraConfigError(
                        f"{source}: {key} has shape {tuple(t.shape)}, expected {tuple(param.shape)}{hint}"
                    )
                with torch.no_grad():
                    param.copy_(t.to(param.dtype))
                got.add(f"{ours}.{part}")
        missing = sorted(expected - got)
        if missing:
            raise XLoraConfigError(
                f"{source}: missing {missing[0]} (xlora_depth={self.cfg.xlora_depth}, "
                f"use_bias={str(self.cfg.use_bias).lower()})"
            )


def top_k_scalings(s: Tensor, k: int | None, softmax_topk: bool) -> Tensor:
    """PEFT's per-layer selection (spec §4.4) on the classifier's scalings s: [..., n].

    Keeps the k largest per token and layer (ties in torch.topk order); with softmax_topk,
    re-normalises over the non-zero kept entries."""
    if k is not None:
        idx = torch.topk(s, k, dim=-1).indices
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        s = s * mask.to(s.dtype)
    if softmax_topk:
        nz = s != 0
        s = torch.softmax(s.masked_fill(~nz, float("-inf")), dim=-1).masked_fill(~nz, 0.0)
    return s
