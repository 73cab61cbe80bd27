"""Exponential moving average of the weights, kept in fp32 beside the model.

Applied from outside the model (torchtitan style): the trainer owns it, checkpoints it, evaluates
with it swapped in, and exports whichever of raw or averaged weights scores better held out.
"""
from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # The usual warm-up, (1 + step) / (10 + step), so early averages are not dominated by the
        # random initialisation when runs are only a few hundred steps long.
        d = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().float() for _, p in model.named_parameters()]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": t.contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[f"ema.{n}"])

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Temporarily load the averaged weights into `model` (for evaluation or export)."""
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved[n])
