"""Weight quantization for serving, applied to a loaded model from outside (the model code is untouched).

- "int8": int8 weights (one scale per output channel) and int8 activations with one scale per token
  row, multiplied with `torch._int_mm`. Per-row activation scales keep a request's result independent
  of what it is batched with; torch's own dynamic quantization uses one scale for the whole batch,
  which would break batch invariance. Measured on this project's 2-core CPU for a (16 x 256) @ (256 x 704)
  product: about 2.4x faster than fp32 (see `unmask bench`).
- "int8wo": int8 weights only (one scale per output channel), multiplied by
  `torch.ops.aten._weight_int8pack_mm` with bfloat16 activations on CPU. A batch-1 decode step is
  bound by reading the weights from memory, and int8 weights are a quarter of fp32's bytes; the
  kernel needs no int8 dot-product instructions. Each output row is computed on its own, so a row's
  result does not depend on what it is batched with (bitwise, unlike fp32 BLAS). Measured on the
  2-core AVX2 EPYC, all 43 linears of the default dLLM in turn at 1 / 4 / 8 / 16 rows: 10.0 / 16.4 /
  15.5 / 17.2 ms in fp32, 3.5 / 5.0 / 6.8 / 11.6 ms int8wo (`bench/matmul_rows.py --model`). Held-out
  bits per byte change by +0.0001 (dLLM) and +0.0002 (AR twin).
- "bf16": cast weights to bfloat16 (for CUDA; on CPU it is usually slower than fp32).
"""
from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import UserError

MODES = ("int8", "int8wo", "bf16")


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


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)  # (out,)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu":
            # The kernel's vectorised path is bf16 (fp32 inputs take a scalar loop, 7x slower).
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self.scale_bf16)
        else:  # no such kernel elsewhere: the same int8 weights and scales, dequantised on the fly
            y = torch.nn.functional.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def swap_linears(module: nn.Module, cls: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every nn.Linear under `module`, in place, with cls(linear)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, cls(child))
        else:
            swap_linears(child, cls)


def quantize_model(model, mode: str):
    """A quantized copy of a Pretrained (the original stays usable for comparison)."""
    if mode not in MODES:
        raise UserError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "int8" and model.device.type == "cpu" and (x := int8_speedup_cpu()) < 1.0:
        warnings.warn(f"int8 matmul runs {1 / x:.1f}x slower than fp32 on this CPU "
                      f"({torch.backends.cpu.get_cpu_capability()}, no int8 dot-product instructions); "
                      "int8 activations will make generation slower here: serve with --quantize int8wo "
                      "(int8 weights only) instead",
                      RuntimeWarning, stacklevel=2)
    q = copy.copy(model)
    net = copy.deepcopy(model.net)
    if mode == "bf16":
        net = net.to(torch.bfloat16)
    else:
        net.lm_head = nn.Linear(net.lm_head.in_features, net.lm_head.out_features, bias=False)
        net.lm_head.weight = nn.Parameter(model.net.lm_head.weight.detach().clone())  # untie before quantizing
        swap_linears(net, Int8Linear if mode == "int8" else Int8WeightOnlyLinear)
    q.net = net.eval()
    return q
