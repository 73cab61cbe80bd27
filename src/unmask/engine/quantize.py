"""Weight quantization for serving, applied to a loaded model from outside (the model code is untouched).

- "int8": int8 weights (one scale per output channel) and int8 activations with one scale per token
  row, multiplied with `torch._int_mm`. Per-row activation scales keep a request's result independent
  of what it is batched with; torch's own dynamic quantization uses one scale for the whole batch,
  which would break batch invariance. Measured on this project's 2-core CPU for a (16 x 256) @ (256 x 704)
  product: about 2.4x faster than fp32 (see `unmask bench`).
- "bf16": cast weights to bfloat16 (for CUDA; on CPU it is usually slower than fp32).
"""
from __future__ import annotations

import copy
import functools
import time
import warnings

import torch
import torch.nn as nn

from ..errors import UserError

MODES = ("int8", "bf16")


@functools.cache
def int8_speedup_cpu(m: int = 16, k: int = 512, n: int = 1408, reps: int = 5) -> float:
    """fp32 matmul time / `torch._int_mm` time for an (m x k) @ (k x n) product on this CPU.

    Why: int8 pays off only where the CPU has int8 dot-product instructions (VNNI/AMX). Measured on
    a 2-core AMD EPYC with AVX2 alone, `_int_mm` ran 8x slower than fp32, so int8 serving there
    is a slowdown. Best of `reps` after a warm-up, so the probe costs milliseconds."""
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    a, b = a8.float(), b8.float()

    def best(f) -> float:
        f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: a @ b) / best(lambda: torch._int_mm(a8, b8))


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight_t", (w / scale).round().clamp(-127, 127).to(torch.int8).t().contiguous())
        self.register_buffer("wscale", scale.t().contiguous())  # (1, out)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = (x2 / s).round().clamp(-127, 127).to(torch.int8)
        if xq.shape[0] <= 16 and xq.device.type == "cuda":
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - xq.shape[0]))  # cuBLASLt int8 needs m > 16
        y = torch._int_mm(xq, self.qweight_t)[: x2.shape[0]].float() * s * self.wscale
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _swap_linears(child)


def quantize_model(model, mode: str):
    """A quantized copy of a Pretrained (the original stays usable for comparison)."""
    if mode not in MODES:
        raise UserError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "int8" and model.device.type == "cpu" and (x := int8_speedup_cpu()) < 1.0:
        warnings.warn(f"int8 matmul runs {1 / x:.1f}x slower than fp32 on this CPU "
                      f"({torch.backends.cpu.get_cpu_capability()}, no int8 dot-product instructions); "
                      "int8 weights will make generation slower here: serve without --quantize int8",
                      RuntimeWarning, stacklevel=2)
    q = copy.copy(model)
    net = copy.deepcopy(model.net)
    if mode == "bf16":
        net = net.to(torch.bfloat16)
    else:
        net.lm_head = nn.Linear(net.lm_head.in_features, net.lm_head.out_features, bias=False)
        net.lm_head.weight = nn.Parameter(model.net.lm_head.weight.detach().clone())  # untie before quantizing
        _swap_linears(net)
    q.net = net.eval()
    return q
