"""Drawing the noise of the forward process.

Noise is drawn for the whole global batch and then sliced per rank, so a data-parallel run sees
exactly the same noise as a single process with the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Noise:
    t: torch.Tensor  # (B,) one time per sequence, or (B, n_blocks) one per block
    u: torch.Tensor  # (B, L) uniforms; token i is masked when u_i < 1 - α(t_i)

    def __getitem__(self, s: slice) -> "Noise":
        return Noise(self.t[s], self.u[s])

    def to(self, device) -> "Noise":
        return Noise(self.t.to(device), self.u.to(device))


def draw_t(n: int, generator: torch.Generator | None, eps: float = 1e-3, antithetic: bool = True) -> torch.Tensor:
    """n times in [eps, 1]. Antithetic draws t_i = (u + i/n) mod 1 cover [0,1) evenly and cut variance."""
    if antithetic:
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        t = (u + torch.arange(n, dtype=torch.float64) / n) % 1.0
    else:
        t = torch.rand(n, generator=generator, dtype=torch.float64)
    return (eps + (1.0 - eps) * t).float()


def draw_noise(
    batch: int, length: int, generator: torch.Generator | None, *, block_size: int | None = None,
    eps: float = 1e-3, antithetic: bool = True,
) -> Noise:
    """block_size=None: one t per sequence (MDLM). Otherwise one t per block, antithetic over batch x blocks."""
    if block_size is None:
        t = draw_t(batch, generator, eps, antithetic)
    else:
        n_blocks = -(-length // block_size)
        t = draw_t(batch * n_blocks, generator, eps, antithetic).view(batch, n_blocks)
    u = torch.rand(batch, length, generator=generator)
    return Noise(t, u)


def token_times(t: torch.Tensor, length: int, block_size: int | None) -> torch.Tensor:
    """Broadcast per-sequence or per-block times to (B, L)."""
    if t.dim() == 1:
        return t[:, None].expand(-1, length)
    return t.repeat_interleave(block_size, dim=1)[:, :length]


def apply_mask(x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    return torch.where(masked, torch.full_like(x0, mask_id), x0)
