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


def apply_fim(x0: torch.Tensor, rate: float, rng: np.random.Generator, prefix_id: int, suffix_id: int,
              middle_id: int) -> torch.Tensor:
    """Rearrange a share `rate` of the windows prefix-suffix-middle (PSM), keeping their length.

    A chosen window x (length L) is cut at two random points i <= j of its first L - 3 tokens and
    becomes `<fim_prefix> x[:i] <fim_suffix> x[j:L-3] <fim_middle> x[i:j]`, the layout the samplers
    give a block or causal model for fill-in-the-middle. The last 3 tokens make room for the markers.
    """
    if rate <= 0:
        return x0
    B, L = x0.shape
    chosen = rng.random(B) < rate
    cuts = np.sort(rng.integers(0, L - 2, size=(B, 2)), axis=1)  # 0 <= i <= j <= L - 3
    out = x0.clone()
    for b in np.flatnonzero(chosen):
        i, j = int(cuts[b, 0]), int(cuts[b, 1])
        x = x0[b, : L - 3]
        out[b] = torch.cat([torch.tensor([prefix_id]), x[:i], torch.tensor([suffix_id]), x[j:],
                            torch.tensor([middle_id]), x[i:j]])
    return out


def global_batch(tokens: np.ndarray, seq_len: int, batch: int, seed: int, step: int, objective: str,
                 block_size: int, eps: float, antithetic: bool, fim_rate: float = 0.0,
                 fim_ids: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, Noise | None]:
    """fim_ids: (prefix, suffix, middle) token ids, needed when fim_rate > 0."""
    rng = np.random.default_rng([seed, step])
    x0 = window_batch(tokens, seq_len, batch, rng)
    if fim_rate > 0:
        # A separate stream, so that turning FIM on leaves the windows and the noise unchanged.
        x0 = apply_fim(x0, fim_rate, np.random.default_rng([seed, step, 1]), *fim_ids)
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
