"""A linear layer with n frozen LoRA adapters mixed per token by X-LoRA scalings.

    y = W x (+ b) + sum_i lam[t, i] * (alpha_i / r_i) * g * B_i A_i x

The adapters are stacked once at load time: A = cat(A_i) [R, in], B = cat(B_i * alpha_i/r_i * g)
[out, R] with R = sum r_i, so a step costs two matmuls whatever n is; the per-token scalings are
expanded to rank space (each lam_i repeated r_i times) and multiply A x in between. Because LoRA
has no bias, scaling the input (PEFT, mistral.rs) equals scaling A x. On the CPU, decode rows take
the base projection and this update in one op of ours (models/csrc/linear.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True, slots=True)
class Scalings:
    """What one pass of the decoder gives its wrapped linears: an argument of the forward
    (`CausalLM.hidden_states(..., lora=...)`), never state kept between passes.

    * `rank`: [N, rows, R] per-token scalings in rank space (rows = L when layerwise, else 1): the
      real pass (`per_token`), or
    * `constant`: one value for every token and adapter: the scaling pass's dummy scalings
      (`fixed`); with `rank` None and `constant` 0 the adapters are skipped and the layer is its
      base linear, as with no scalings at all (lora=None).
    """

    rank: Tensor | None = None
    constant: float = 0.0

    @classmethod
    def per_token(cls, rank: Tensor) -> "Scalings":
        return cls(rank, 0.0)

    @classmethod
    def fixed(cls, value: float) -> "Scalings":
        return cls(None, float(value))


def project(mod: nn.Module, x: Tensor, lora: Scalings) -> Tensor:
    """mod(x) within a pass that carries scalings: a wrapped linear takes them, any other
    projection (one the adapters do not target) is called as is."""
    return mod(x, lora) if isinstance(mod, XLoraLinear) else mod(x)


class XLoraLinear(nn.Module):
    """Wraps a base linear (nn.Linear, a quantized one, or a fused q/k/v or gate/up projection) with
    stacked adapters.

    For each adapted part of the output (one, or several for a fused projection): `spans` gives its
    output rows [start, end) and `rows` the row of `Scalings.rank` it reads (its X-LoRA layer index
    when the scalings are layerwise, else 0). A is the parts' stacked A's, part-major ([P * R, in]).
    B is kept transposed and compact ([R, out]): column n holds B's row n of the part whose span
    contains n, so a fused projection stores no zero blocks (csrc/linear.cpp describes the layout).

    The adapters may be kept in a wider dtype than the base (float32 under a bf16 model on the CPU,
    where tiny bf16 matmuls cost several times more than float32 ones): the input is upcast for
    them and their sum added back in the base's dtype."""

    # NOTE: whether decode rows may use our CPU ops (torch.ops.mistralrs.lora_linear / lora_add_);
    # set with the rest of the model's modules at load (models.llama.use_cpu_kernels)
    cpu_ops: bool = False

    def __init__(
        self,
        base: nn.Module,
        lora_a: Tensor,
        lora_bt: Tensor,
        rows: list[int],
        indices: list[int],
        spans: list[tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.base = base
        self.parts = len(rows)
        self.rank = lora_bt.shape[0]
        if lora_a.shape[0] != self.parts * self.rank:
            raise ValueError(f"A has {lora_a.shape[0]} rows for {self.parts} parts of rank {self.rank}")
        self.spans = [tuple(sp) for sp in spans] if spans is not None else [(0, lora_bt.shape[1])]
        self.lora_a = nn.Parameter(lora_a, requires_grad=False)  # [parts * R, in]
        # NOTE: transposed ([R, out], contiguous): the faster layout for x @ B^T; alpha/r and g folded in
        self.lora_bt = nn.Parameter(lora_bt, requires_grad=False)
        self._whole = self.parts == 1 and self.spans[0] == (0, lora_bt.shape[1])
        # NOTE: what our CPU ops take per part: (start, end, Scalings row), as one int64 tensor made
        # here (the op binding parses a tensor faster than a Python int list: ~2.5 us a call)
        self._parts = torch.tensor([(a, b, r) for (a, b), r in zip(self.spans, rows)], dtype=torch.long)
        # the ops' arguments per compute dtype, made on first use: (w, bias) of a dense base or None, A, B^T
        self._kernel_args: dict[torch.dtype, tuple] = {}
        if all(r == rows[0] for r in rows):  # one row for every part (not layerwise)
            self.lo, self.hi = rows[0], rows[0] + 1
        elif rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive rows (the default ordering)
            self.lo, self.hi = rows[0], rows[-1] + 1
        else:
            self.lo = self.hi = None
        self.register_buffer("row_index", torch.tensor(rows, device=lora_a.device), persistent=False)
        self.indices = indices  # X-LoRA layer index of each part (reports, tests)

    def forward(self, x: Tensor, lora: Scalings | None = None) -> Tensor:
        # x: [N, in] -> [N, out]; no scalings (or zero ones): the base layer alone
        s = lora
        if s is None or (s.rank is None and s.constant == 0.0):
            return self.base(x)
        if self.cpu_ops and x.dim() == 2 and x.shape[0] <= 8:
            return self._kernel(x, s)
        y = self.base(x)
        xa = x if x.dtype == self.lora_a.dtype else x.to(self.lora_a.dtype)
        h = xa @ self.lora_a.t()  # [N, parts * R]
        if s.rank is None:
            # NOTE: the dummy scalings of the scaling pass: the same value for every adapter.
            h = h * s.constant
        else:
            # per-token scalings in rank space: [N, parts or 1, R], broadcast over the parts
            lam = s.rank[:, self.lo : self.hi] if self.lo is not None else s.rank[:, self.row_index]
            h = (h.view(h.shape[0], -1, self.rank) * lam).flatten(1)
        if self._whole:
            return y.addmm_(h, self.lora_bt) if y.dtype == h.dtype else y.add_(h @ self.lora_bt)
        for j, (a, b) in enumerate(self.spans):  # NOTE: add_ rounds once into y's dtype
            y[:, a:b].add_(h[:, j * self.rank : (j + 1) * self.rank] @ self.lora_bt[:, a:b])
        return y

    def _kernel(self, x: Tensor, s: Scalings) -> Tensor:
        """Decode rows on the CPU: the same math as forward's, in one op over a dense base whose
        dtype the adapters can take (two with any other base: its own, then lora_add_)."""
        args = self._kernel_args.get(x.dtype) or self._make_kernel_args(x.dtype)
        dense, a, bt = args
        if dense is not None:
            return torch.ops.mistralrs.lora_linear(x, dense[0], dense[1], a, bt, self._parts, s.rank, s.constant)
        y = self.base(x)
        if not y.is_contiguous():
            y = y.contiguous()
        torch.ops.mistralrs.lora_add_(y, x, a, bt, self._parts, s.rank, s.constant)
        return y

    def _make_kernel_args(self, dtype: torch.dtype) -> tuple:
        """A and B^T for the CPU ops under a base computing in `dtype`: bf16 copies under bf16 (the
        adapters are read from memory every token: half the bytes; accumulation stays float32),
        float32 otherwise (fp16 would flush small B values to zero). lora_linear reads a dense
        base's weight itself when the adapters have its dtype.

        NOTE: holds the base's weight and bias Parameters: replacing them after the first decode
        step (rather than copying into them) would go unseen."""
        want = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        a, bt = (t.detach().to(want).contiguous() for t in (self.lora_a, self.lora_bt))
        base = self.base
        dense = (base.weight, base.bias) if isinstance(base, nn.Linear) and base.weight.dtype == dtype == want else None
        args = self._kernel_args[dtype] = (dense, a, bt)
        return args

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, indices={self.indices}"
