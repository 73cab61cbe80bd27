"""fp32 linear layers for CPU decode steps, applied to a loaded model from outside (the model code is
untouched).

A decode step multiplies a handful of rows (AR: one per request; a block-diffusion model: its block
of 4, or 8 at a block start) by every weight matrix. torch's `F.linear` computes `x @ W.T`, and
MKL runs that shape badly for a few rows, even on one thread. The same product written the other
way round, `(W @ x.T).T`, puts the weight's thousands of output rows in the GEMM's M dimension,
where MKL blocks and threads well. One row still takes MKL's slower matrix-vector path, so it is
padded to two; 11-15 rows are padded to 16, which MKL runs faster than 13.
Measured on the 2-core AVX2 EPYC, all 43 linears of the default dLLM in turn (best of 15 rounds,
`bench/matmul_rows.py --model --rows 1 4 8 16 64 256 --rounds 15`):

    rows        1      4      8     16     64    256
    F.linear  10.4   17.0   14.7   17.4   31.6   88.4 ms
    this       7.7    6.4    9.7   14.0   25.1   79.4 ms

Beyond MAX_ROWS rows (prefill) the two orders measured level, and `F.linear` keeps them.

Both orders compute each output as a dot product in fp32; they round differently (about 1e-6
relative), as `F.linear` already does between a row alone and the same row in a batch.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantize import swap_linears

MAX_ROWS = 256  # measured crossover (see above); above it F.linear


def padded_rows(m: int) -> int:
    """How many rows to hand MKL for m real ones (measured, whole model: 1 row 9.5 ms, 2 rows 5.8;
    13-15 rows 18-24 ms, 16 rows 12-14). Zero rows fill the gap and their outputs are dropped."""
    if m <= 4:
        return 2 if m <= 2 else 4
    if m <= 10:
        return m
    return -(-m // 16) * 16


class WeightLeftLinear(nn.Module):
    """y = x @ W.T computed as (W @ x.T).T for up to MAX_ROWS rows. Shares the weight tensor."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.numel() // x.shape[-1]
        if m > MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        # Row-major rows: W @ (column-major x).T is a different MKL case, and measured as slow as F.linear.
        x2 = x.reshape(m, x.shape[-1]).contiguous()
        if (p := padded_rows(m)) != m:
            x2 = F.pad(x2, (0, 0, 0, p - m))
        y = torch.mm(self.weight, x2.t())[:, :m].t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def applies(net: nn.Module) -> bool:
    """Only fp32 weights on a CPU: other dtypes take other kernels, and cuBLAS needs no help."""
    p = next(net.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


def weight_left(net: nn.Module) -> nn.Module:
    """A copy of `net` whose nn.Linear layers are WeightLeftLinear. Parameters and buffers are shared,
    not copied, so this costs no memory and the caller's module is left as it was."""
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    out = copy.deepcopy(net, memo)
    swap_linears(out, WeightLeftLinear)
    return out

