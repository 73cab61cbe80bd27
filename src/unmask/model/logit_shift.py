"""Reading logits of families whose position i predicts token i + 1 (`ModelConfig.logit_shift`).

The network never shifts. Dream and Fast-dLLM v2 were initialised from AR models and keep their
convention: the logits at position i score token i + 1. Their samplers read `logits[i - 1]` for the
token at i, and position 0 (which nothing predicts) reuses its own logits.
"""
from __future__ import annotations

import torch


def align_logits(logits: torch.Tensor, logit_shift: int) -> torch.Tensor:
    """(B, T, V) raw logits -> (B, T, V) whose entry i scores token i (Dream's `cat(l[:, :1], l[:, :-1])`)."""
    if logit_shift == 0:
        return logits
    if logit_shift != 1:
        raise ValueError(f"logit_shift must be 0 or 1, got {logit_shift}")
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
