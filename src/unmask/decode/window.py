"""What one request contributes to one forward."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Window:
    """Query positions [start, end) are fed (their tokens are canvas[start:end]); keys are positions
    [0, key_end): those below `start` come from the cache. [lo, hi) are the canvas positions this
    forward scores: their logits come from the model's outputs at [lo - shift, hi - shift), where
    `shift` is the decode plan's logit shift (1 for autoregressive-style heads, whose output at
    position p predicts the token at p + 1)."""

    start: int
    end: int
    key_end: int
    lo: int
    hi: int
