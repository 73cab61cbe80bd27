"""Deterministic training batches: every batch is a pure function of (seed, step).

Because nothing about the data stream lives in process state, a resumed run sees exactly the batches
an uninterrupted one would, and every rank can draw the same global batch and keep its own slice.
"""
from __future__ import annotations

import numpy as np
import torch

from ..diffusion import Noise, draw_noise


def window_batch(tokens: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def global_batch(tokens: np.ndarray, seq_len: int, batch: int, seed: int, step: int, objective: str,
                 block_size: int, eps: float, antithetic: bool) -> tuple[torch.Tensor, Noise | None]:
    rng = np.random.default_rng([seed, step])
    x0 = window_batch(tokens, seq_len, batch, rng)
    if objective == "ar":
        return x0, None
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    noise = draw_noise(batch, seq_len, g, block_size=block_size if objective == "bd3lm" else None,
                       eps=eps, antithetic=antithetic)
    return x0, noise


def eval_batches(tokens: np.ndarray, seq_len: int, batch: int, n_batches: int, seed: int, objective: str,
                 block_size: int, eps: float = 1e-3):
    """A fixed set of held-out windows and noise, so successive evaluations are comparable."""
    for i in range(n_batches):
        yield global_batch(tokens, seq_len, batch, seed + 1_000_003, i, objective, block_size, eps, True)
