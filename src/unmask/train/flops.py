"""Training FLOPs per token and model FLOPs utilisation (MFU), PaLM-style accounting.

6 FLOPs per parameter per token (forward + backward) for the matmuls, plus attention's
QK^T and AV: 12 * layers * d_model * keys-per-query. BD3-LM runs every window twice (x_t ⊕ x_0),
so its cost per data token is twice that of a model over the window alone.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig

# Dense bf16 peak of known accelerators, TFLOP/s; anything else needs train.peak_tflops.
_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    matmul = 6 * n_params  # n_params: the parameters used in matmuls (body + output head)
    if cfg.objective == "bd3lm":
        # Each half sees at most ~seq_len keys (noisy half: earlier clean blocks plus its own block).
        attn = 12 * cfg.n_layers * cfg.d_model * seq_len
        return 2 * matmul + 2 * attn
    keys = seq_len / 2 if cfg.attention in ("causal", "block") else seq_len
    return matmul + 12 * cfg.n_layers * cfg.d_model * keys


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _PEAKS.items():
            if key in name:
                return peak * 1e12
    return None
