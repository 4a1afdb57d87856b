"""Batched LSTM inference for the CPU scorer: step-by-step across layers, cache-resident buffers.

Measured on the 2-core AVX2 machine this was written on (window 140, embedding 32, batch 1024):
oneDNN's fused RNN behind ``nn.LSTM`` ran at ~30 GFLOP/s, a quarter of the float32 GEMM rate, and
``tanh`` ran ~5× slower than ``sigmoid``. Here layers advance together one timestep at a time, so each
layer's output is consumed while it is still in cache (no ``[T, B, H]`` intermediates); each step is one
``addmm`` per layer into a preallocated gate buffer plus five in-place elementwise passes; every tanh is
computed as ``2·σ(2x) − 1`` (g-gate weight rows pre-scaled by 2, exact in binary floating point); cells
hold ``−h`` and ``2c``, which saves two passes per step (consumers absorb the sign in their weights).
Results equal ``nn.LSTM`` to float32 rounding (checked in tests).
"""

from __future__ import annotations

import torch
from torch import nn


class InferenceCell:
    """One single-layer ``nn.LSTM`` stepped by hand for a fixed batch; not for training.

    Cells of a stack share one buffer ``[B, width]``: a cell reads the columns ``[col, col + I + 1 + H)``
    — its input, a column of ones, its own state ``−h`` — and writes its new ``−h`` in place, where the
    next cell reads it as input. A step is thus one GEMM against ``[x_sign·W_ih; b; −W_hh]`` with no
    copies between layers and no bias pass. ``x_sign = −1`` when the input holds another cell's ``−h``.
    """

    def __init__(self, lstm: nn.LSTM, buf: torch.Tensor, col: int, x_sign: float = 1.0) -> None:
        h, n_in = lstm.hidden_size, lstm.input_size
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        order = order.to(lstm.weight_ih_l0.device)
        scale = torch.ones(4 * h, dtype=buf.dtype, device=buf.device)
        scale[3 * h :] = 2.0  # g gate: σ(2x) gives tanh(x) = 2σ(2x) − 1
        w_ih = lstm.weight_ih_l0[order] * scale[:, None] * x_sign
        w_hh = lstm.weight_hh_l0[order] * scale[:, None] * -1.0
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[order] * scale
        self.w_t = torch.cat([w_ih, bias[:, None], w_hh], dim=1).t().contiguous()  # [I + 1 + H, 4H]
        self.inp = buf[:, col : col + n_in + 1 + h]  # input columns, a column of ones, this cell's −h
        self.inp[:, n_in] = 1.0  # the bias rides in the GEMM: no separate pass to add it
        self.neg_h = buf[:, col + n_in + 1 : col + n_in + 1 + h]
        batch = buf.shape[0]
        self.c2 = buf.new_zeros(batch, h)  # 2·c
        self.tmp = buf.new_empty(batch, h)
        self.gates = buf.new_empty(batch, 4 * h)
        self.i, self.f, self.o, self.g = (self.gates[:, k * h : (k + 1) * h] for k in range(4))

    def step(self) -> torch.Tensor:
        """Advance one timestep; returns ``−h`` (a view of the shared buffer, overwritten next step)."""
        torch.mm(self.inp, self.w_t, out=self.gates)
        self.gates.sigmoid_()  # i, f, o = σ(pre); g = σ(2·pre)
        self.c2.mul_(self.f).addcmul_(self.i, self.g, value=4.0).sub_(self.i, alpha=2.0)  # 2c ← f·2c + 2i·tanh
        torch.sigmoid(self.c2, out=self.tmp)
        return torch.addcmul(self.o, self.o, self.tmp, value=-2.0, out=self.neg_h)  # −o·tanh(c)
