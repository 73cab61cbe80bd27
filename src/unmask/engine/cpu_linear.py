"""fp32 linear layers for CPU decode steps, applied to a loaded model from outside (the model code is
untouched).

A decode step multiplies a handful of rows (AR: one per request; a block-diffusion model: its block
of 4, or 8 at a block start; 16 requests in flight: 16-128) by every weight matrix. torch's
`F.linear` computes `x @ W.T` with MKL, which runs that shape badly for a few rows: it repacks the
weight on every call. Two faster kernels, each best at some row counts:

- **oneDNN with the weight packed once** (`torch.ops.mkldnn._reorder_linear_weight`, the blocked
  layout its inner-product kernels read): 1 row, and 5-256 rows.
- **`(W @ x.T).T`** on MKL, which puts the weight's thousands of output rows in the GEMM's M dimension,
  where MKL blocks and threads well: 2-4 rows (1 row would take MKL's slower matrix-vector path,
  so it is padded to two). It is also the whole story where no packed copy is kept (see below).

Measured on the 2-core AVX2 EPYC, one whole forward of the default dLLM, ms (interleaved, best of
40; `bench/matmul_rows.py --model` times the linears alone):

    rows           1     2     4     6     8    16    32    64   128
    (W @ x.T).T   8.3   7.8   9.2  11.6  11.5  15.5  21.3  31.3  53.5
    oneDNN        7.9   8.6   9.9  10.7  11.0  14.1  19.2  29.0  50.3

In the engine (interleaved A/B, `bench/profile_engine.py --no-pack` is the switch) 16 requests in flight
ran 5-15% faster for the dLLM and 1-6% for the AR twin; batch 1 stayed within this VM's noise.
Beyond MAX_ROWS rows (prefill) `F.linear` measured a little faster than either, and keeps them.

The packed copy is a second fp32 copy of every weight, so it is only kept while the model's linear
weights total at most PACK_LIMIT_BYTES: a multi-GB foreign checkpoint on a CPU keeps one copy.
The copy is taken when the engine is built; changing the model's weights afterwards needs a new
Engine (nothing in unmask trains through an Engine).

All three compute each output as an fp32 dot product; they round differently (about 1e-6 relative),
as `F.linear` already does between a row alone and the same row in a batch.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantize import swap_linears

MAX_ROWS = 256  # measured crossover (see above); above it F.linear
PACK_LIMIT_BYTES = 1 << 30  # keep a packed copy only for models whose linear weights fit in 1 GiB
_LEFT_ROWS = range(2, 5)  # row counts where (W @ x.T).T beat oneDNN


def padded_rows(m: int) -> int:
    """How many rows to hand MKL's (W @ x.T) for m real ones (measured, whole model: 1 row 9.5 ms,
    2 rows 5.8; 13-15 rows 18-24 ms, 16 rows 12-14). Zero rows fill the gap and their outputs are dropped."""
    if m <= 4:
        return 2 if m <= 2 else 4
    if m <= 10:
        return m
    return -(-m // 16) * 16


def _can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuLinear(nn.Module):
    """y = x @ W.T (+ b) through the fastest measured kernel for x's row count. Shares the weight
    tensor with the nn.Linear it replaces; with pack=True it also keeps a oneDNN-packed copy."""

    def __init__(self, linear: nn.Linear, pack: bool = False):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()) if pack else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.numel() // x.shape[-1]
        if m > MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(m, x.shape[-1])
        # The packed copy has no autograd; anything that needs gradients takes the weight itself.
        if self.packed is not None and m not in _LEFT_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [], "")
            return y.reshape(*x.shape[:-1], self.out_features)
        # Row-major rows: W @ (column-major x).T is a different MKL case, and measured as slow as F.linear.
        x2 = x2.contiguous()
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


def linear_bytes(net: nn.Module) -> int:
    """Bytes of the distinct nn.Linear weights (a tied head counts once)."""
    weights = {id(m.weight): m.weight for m in net.modules() if isinstance(m, nn.Linear)}
    return sum(w.numel() * w.element_size() for w in weights.values())


def cpu_linears(net: nn.Module, pack: bool | None = None) -> nn.Module:
    """A copy of `net` whose nn.Linear layers are CpuLinear. Parameters and buffers are shared, not
    copied, and the caller's module is left as it was. pack: keep oneDNN-packed weights (default:
    when the build has oneDNN and the linear weights fit PACK_LIMIT_BYTES)."""
    if pack is None:
        pack = _can_pack() and linear_bytes(net) <= PACK_LIMIT_BYTES
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    out = copy.deepcopy(net, memo)
    swap_linears(out, lambda lin: CpuLinear(lin, pack))
    return out
