"""A linear layer with n frozen LoRA adapters mixed per token by X-LoRA scalings.

    y = W x (+ b) + sum_i lam[t, i] * (alpha_i / r_i) * g * B_i A_i x

The adapters are stacked once at load time: A = cat(A_i) [R, in], B = cat(B_i * alpha_i/r_i * g)
[out, R] with R = sum r_i, so a step costs two matmuls whatever n is; the per-token scalings are
expanded to rank space (each lam_i repeated r_i times) and multiply A x in between. Because LoRA
has no bias, scaling the input (PEFT, mistral.rs) equals scaling A x.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class Scalings:
    """What the wrapped linears of one model read during a pass; the model sets it before each pass.

    NOTE: one object shared by the model and its wrappers (given to each at construction), so a pass
    sets the scalings once instead of on every wrapped linear.

    * `rank`: [N, rows, R] per-token scalings in rank space (rows = L when layerwise, else 1), or
    * `constant`: one value for every token and adapter (the scaling pass's dummy scalings); with
      `rank` None and `constant` 0 the adapters are skipped and the layer is the base linear.
    """

    __slots__ = ("rank", "constant")

    def __init__(self) -> None:
        self.rank: Tensor | None = None
        self.constant: float = 0.0

    def set_rank(self, rank: Tensor) -> None:
        self.rank, self.constant = rank, 0.0

    def set_constant(self, value: float) -> None:
        self.rank, self.constant = None, float(value)


class XLoraLinear(nn.Module):
    """Wraps a base linear (nn.Linear, a quantized one, or a fused q/k/v or gate/up projection) with
    stacked adapters.

    `rows`: for each adapted part of the output (one, or several for a fused projection), the row of
    `Scalings.rank` it reads: its X-LoRA layer index when the scalings are layerwise, else 0. A
    fused projection's A is the parts' stacked A's (part-major) and its B is block-structured: part
    j's B sits in its output rows and its own R columns.

    The adapters may be kept in a wider dtype than the base (float32 under a bf16 model on the CPU,
    where tiny bf16 matmuls cost several times more than float32 ones): the input is upcast for
    them and their sum added back in the base's dtype."""

    def __init__(self, base: nn.Module, lora_a: Tensor, lora_b: Tensor, scalings: Scalings, rows: list[int],
                 indices: list[int], small_rows_op: Callable[[Tensor], bool] | None = None):
        super().__init__()
        self.base = base
        # NOTE: given by the model (lora sits below models): whether a call may use
        # torch.ops.mistralrs.lora_add_ (our CPU kernels) for the adapters of decode rows
        self.small_rows_op = small_rows_op
        self._bf16: tuple[Tensor, Tensor] | None = None  # bf16 copies of A and B^T for lora_add_, made on first use
        self.parts = len(rows)
        self.lora_a = nn.Parameter(lora_a, requires_grad=False)  # [parts * R, in]
        # NOTE: stored transposed ([parts * R, out], contiguous): the faster layout for x @ B^T.
        self.lora_bt = nn.Parameter(lora_b.t().contiguous(), requires_grad=False)  # alpha/r and g folded in
        self.scalings = scalings
        self.rank = lora_a.shape[0] // self.parts
        if all(r == rows[0] for r in rows):  # one row for every part (not layerwise)
            self.lo, self.hi = rows[0], rows[0] + 1
        elif rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive rows (the default ordering)
            self.lo, self.hi = rows[0], rows[-1] + 1
        else:
            self.lo = self.hi = None
        self.register_buffer("row_index", torch.tensor(rows, device=lora_a.device), persistent=False)
        self.indices = indices  # X-LoRA layer index of each part (reports, tests)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, in] -> [N, out]
        y = self.base(x)
        s = self.scalings
        if s.rank is None and s.constant == 0.0:
            return y
        if (x.dim() == 2 and x.shape[0] <= 8 and y.is_contiguous() and self.lora_a.dtype == torch.float32
                and self.small_rows_op is not None and self.small_rows_op(x)):
            # NOTE: decode rows on the CPU: the whole adapter update in one op (same math as below;
            # ~7 torch ops otherwise, ~100 wrapped projections per X-LoRA token)
            lam = None if s.rank is None else s.rank[:, self.lo : self.hi] if self.lo is not None else s.rank[:, self.row_index]
            a, bt = self.lora_a, self.lora_bt
            if y.dtype == torch.bfloat16:
                # NOTE: under a bf16 base the op reads bf16 copies: half the bytes a token (the
                # adapters are read from memory every step); accumulation stays float32
                if self._bf16 is None:
                    self._bf16 = (a.to(torch.bfloat16), bt.to(torch.bfloat16))
                a, bt = self._bf16
            torch.ops.mistralrs.lora_add_(y, x, a, bt, lam, float(s.constant))
            return y
        xa = x if x.dtype == self.lora_a.dtype else x.to(self.lora_a.dtype)
        h = xa @ self.lora_a.t()  # [N, parts * R]
        if s.rank is None:
            # NOTE: the dummy scalings of the scaling pass: the same value for every adapter.
            h = h * s.constant
        else:
            # per-token scalings in rank space: [N, parts or 1, R], broadcast over the parts
            lam = s.rank[:, self.lo : self.hi] if self.lo is not None else s.rank[:, self.row_index]
            h = (h.view(h.shape[0], -1, self.rank) * lam).flatten(1)
        if y.dtype == h.dtype:
            return y.addmm_(h, self.lora_bt)
        return y.add_(h @ self.lora_bt)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, indices={self.indices}"
