"""Noise schedules for absorbing-state diffusion: α_t is the probability a token is still clean."""
from __future__ import annotations

import math

import torch


class Schedule:
    name: str

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The continuous-time NELBO weight -α'_t / (1 - α_t) on masked-token cross-entropy."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))


class Linear(Schedule):
    name = "linear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def weight(self, t):
        return 1.0 / t  # exact form; avoids 0/0 rounding near t = 0


class Cosine(Schedule):
    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


_SCHEDULES = {"linear": Linear, "cosine": Cosine}


def get_schedule(name: str) -> Schedule:
    try:
        return _SCHEDULES[name]()
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(_SCHEDULES)}") from None
