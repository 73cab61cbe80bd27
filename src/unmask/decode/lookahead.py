"""Block lookahead: a block's last step also runs the next block's first step, on a guess.

With an exact KV cache, a block model decodes each block in a few steps, and the first step of
every block carries two blocks: the one just finished (its keys, now computed from its final
tokens, go to the cache) and the new one, all masks. On a CPU at batch 1 that block-start forward
costs about as much as a step with twice the rows, and at 2-3 tokens per forward more than half of
all steps are block starts.

When a block has exactly one masked position left, its next step is certain to be its last: every
policy commits at least one position per step. Only the token is unknown, and the previous
forward already proposed one (the draft). So that step carries a second row for the same request:
the block-start window of the next block, computed on the canvas with the draft filled in. If the
step then commits exactly the draft, that row is exactly the forward the next step would have run
(same tokens, positions, keys and mask), so its logits are used as the next block's first step and
the next block-start forward is skipped. Otherwise the row is thrown away, and the next step runs
the block start as usual. Outputs are therefore the same with and without lookahead; only the
number of forwards changes. (Both rows run in one batched forward, so as with any batching the
floating-point sums may differ in the last bits.)

The cache: the lookahead row writes the finished block's keys to their own pages (right when the
draft holds, and rewritten by the next block start when it does not) and the next block's noisy
keys to theirs (rewritten by every later step of that block). The step's ordinary row would write
the same pages with its noisy keys in the same forward, so its keys go to a page borrowed from the
pool for that step (ModelRunner.forward's `scratch`).

Only greedy rows look ahead: a sampling row would draw noise for a row that may be thrown away,
and the noise a request draws must not depend on it. A forward counts once in a request's NFE,
whatever rows it carries.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .plan import Applied, commit_block_step, end_block
from .window import Window

if TYPE_CHECKING:
    from ..engine.request import Request


def _guess(r: Request, gate: float | None = None) -> list[tuple[int, int]] | None:
    """[(position, token)]: the open positions of r's block and their drafts, when r's next step can
    carry a lookahead row; else None. (Only BlockExactPlan asks: block-causal, exact cache.)

    One open position: the next step is certain to end the block. Several (only with a `gate`): the
    step ends the block only if the policy commits all of them, so the row is run only when the
    previous forward was at least `gate` sure of every draft; when the step leaves one open, the
    row is thrown away (a wasted row, not a wrong token)."""
    if not r.lookahead or r.draft is None:
        return None
    if r.step_in_block == 0 or r.span_idx + 1 >= len(r.spans):
        return None  # no draft yet for this block, or no next block
    b, e = r.block
    block = r.canvas[b:e].tolist()
    open_ = [i for i, t in enumerate(block) if t == r.mask_id]
    if not open_:
        return None
    if len(open_) > 1 and (gate is None or r.draft_conf is None
                           or not all(float(r.draft_conf[i]) >= gate for i in open_)):
        return None
    guess = [(b + i, int(r.draft[i])) for i in open_]
    if any(t in r.stop_ids for _, t in guess) or any(t in r.stop_ids for t in block):
        return None  # the request ends with this block
    return guess


def lookahead_row(r: Request, gate: float | None = None) -> tuple[Window, torch.Tensor] | None:
    """The lookahead row of r's next step, as (window, canvas with the drafts filled in), or None
    when the step cannot carry one."""
    g = _guess(r, gate)
    if g is None:
        return None
    canvas = r.canvas.clone()
    for pos, tok in g:
        canvas[pos] = tok
    b2, e2 = r.spans[r.span_idx + 1]
    return Window(r.cached, e2, e2, b2, e2), canvas


def key_end(r: Request, w: Window, gate: float | None = None) -> int:
    """The cache positions r's next step needs (its window w), a lookahead row included."""
    if _guess(r, gate) is None:
        return w.key_end
    return max(w.key_end, r.spans[r.span_idx + 1][1])


def take_lookahead(r: Request, done: Applied, extra) -> Applied:
    """After r's block step (which did not finish r): if the block ended on the canvas the
    lookahead row guessed, apply that row as the next block's first step."""
    wa, canvas, commit_a, tokens_a = extra
    if r.block != (wa.lo, wa.hi) or not torch.equal(r.canvas[wa.start:wa.lo], canvas[wa.start:wa.lo]):
        return done
    r.cached = max(r.cached, wa.lo)  # the lookahead row wrote the finished block's keys
    committed = done.committed + commit_block_step(r, wa, commit_a, tokens_a)
    return Applied(committed, end_block(r), extra_used=True)
