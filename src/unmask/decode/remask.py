"""Self-correction by remasking: committed tokens of the current block go back to mask when the model,
asked again, no longer believes in them.

How the model is asked. A masked-diffusion model's output at a position whose input is a real token
is untrained (SUBS: clean positions are copied through and carry no loss), so a committed token's
confidence cannot be read off the next forward as it stands. Instead each step of a request with
`remask` hides one committed position p of its current block from its own input (p is fed as
[MASK]; every other position as it is) and reads the model's probability of the token at p from that
forward: a leave-one-out check that costs no extra row (WINO's verification, one position per step).
The position checked is the one the model was least sure of when it was committed (or when it was
last checked). Below `remask` it goes back to mask and is decoded again; otherwise the new
probability is kept as its confidence. The other positions of that step do not see p's token.

Bounds: each position is revised at most `MAX_REVISIONS` times, and only while its block is being
decoded (a finished block's keys are final), so every request still finishes. Only positions the
model generated are checked (never a prompt or a template's text).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .window import Window

if TYPE_CHECKING:
    from ..engine.request import Request

MAX_REVISIONS = 1  # times one position may go back to mask


def pick(r: Request, w: Window) -> int | None:
    """The absolute position this step hides and checks, or None (nothing committed in the block yet,
    or every committed position already revised as often as allowed)."""
    if w.lo == w.hi or r.span_idx >= len(r.spans):
        return None
    b, e = r.block
    if not (w.lo <= b and e <= w.hi):
        return None
    seg = slice(b, e)
    ok = r.generated_mask[seg] & (r.canvas[seg] != r.mask_id) & (r.revisions[seg] < MAX_REVISIONS)
    if not bool(ok.any()):
        return None
    conf = torch.where(ok, r.confidence[seg], torch.full_like(r.confidence[seg], float("inf")))
    return b + int(conf.argmin())


def judge(r: Request, p: int, logits: torch.Tensor) -> bool:
    """After the forward that hid p: remask it (True) when the model's probability of its token,
    `logits` being the scores at p, is below the request's threshold."""
    prob = float(torch.softmax(logits.float(), -1)[int(r.canvas[p])])
    if prob < r.s.remask:
        r.canvas[p] = r.mask_id
        r.revisions[p] += 1
        r.confidence[p] = float("inf")
        r.revised += 1
        return True
    r.confidence[p] = prob
    return False


def record(r: Request, w: Window, committed: list[int], conf: torch.Tensor) -> None:
    """Keep the confidence each newly committed position had (what `pick` ranks by)."""
    for c in committed:
        p = r.lo + c
        if w.lo <= p < w.hi:
            r.confidence[p] = float(conf[p - w.lo])
