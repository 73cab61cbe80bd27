"""Decode plans: one object per way of decoding a model, asked by the engine at every step.

A plan owns everything that depends on how a model is decoded: which positions the next forward
feeds and scores (`window`), which keys a query may see (`attend`), where a position's logits come
from (`logit_shift`), how a step's commits are applied and when a request is done (`apply`), what
happens to the cache bookkeeping after a forward (`after_forward`), the cache's page size, the
longest window that counts as a decode step (`decode_window`, for static shape buckets) and extra
rows a step may carry (`extra_row`: block lookahead). The engine, runner and scheduler never test
a mode string; they call these methods. Plans hold no per-request state: that lives in `Request`.

    plan             model attention   cache
    BlockExactPlan   block-causal      exact, paged; finished blocks fused into the next step
    CausalPlan       causal            exact, paged; one token per step
    FullApproxPlan   full              Fast-dLLM dual or prefix cache, refreshed at block starts
    NoCachePlan      any               none: every forward re-encodes the canvas from position 0
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .window import Window

if TYPE_CHECKING:
    from ..engine.request import Request


class Applied(NamedTuple):
    """What applying one step did to a request."""

    committed: list[int]  # positions written, relative to the request's first generated position
    done: str | None  # "stop" or "length" when the request is finished
    extra_used: bool = False  # the step's extra row was taken as the next step (a lookahead hit)


def block_causal(block_size: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return (k[:, None, :] // block_size) <= (q[:, :, None] // block_size)


def causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return k[:, None, :] <= q[:, :, None]


def full(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool)


class DecodePlan:
    """The interface, with the block-wise behaviour most plans share (a canvas cut into blocks, each
    decoded in a few steps, the request ending with a block that holds a stop token)."""

    name: str = ""  # the cache mode a user names: "exact", "dual", "prefix", "none"
    uses_cache: bool = True
    single_open: bool = False  # every step scores exactly one open position, always written (no ranking)
    decode_window: int = 0  # longest window that counts as decoding (0: never bucket, never split prefills)
    logit_shift: int = 0  # the model's output at position p scores the token at p + logit_shift
    lookahead: bool = False  # may carry block-lookahead rows (engine/lookahead.py)

    def __init__(self, block_size: int, logit_shift: int = 0):
        self.block_size = block_size
        self.logit_shift = logit_shift
        # Longest stretch of clean prompt one forward encodes into the cache (plans with an exact
        # cache); a longer prompt is prefilled in chunks of this many tokens, scoring nothing, instead
        # of one quadratic attention over all of it. None: in one forward.
        self.prefill_chunk: int | None = None

    def chunk(self, start: int, clean_end: int) -> Window | None:
        """A prefill chunk [start, start + prefill_chunk) when more clean prompt than that lies between
        the cache's end and `clean_end` (where the next forward must start scoring); else None."""
        n = self.prefill_chunk
        if n is None or clean_end - start <= n:
            return None
        return Window(start, start + n, start + n, start + n, start + n)

    # ---- shape of the cache and of the steps ----------------------------------------------------
    @property
    def page_size(self) -> int:
        return 16

    @property
    def needs_prompt(self) -> bool:
        """Whether a request needs at least one prompt token (its first position's logits come from
        the position before it)."""
        return self.logit_shift > 0

    def attend(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, T, S) bool: may a query at absolute position q (B, T) see a key at position k (B, S)."""
        raise NotImplementedError

    # ---- one step ------------------------------------------------------------------------------
    def window(self, r: Request) -> Window:
        raise NotImplementedError

    def key_end(self, r: Request) -> int:
        """Cache positions r's next step needs (extra rows included); the scheduler reserves them."""
        return self.window(r).key_end

    def extra_row(self, r: Request) -> tuple[Window, torch.Tensor] | None:
        """A second row r's next step may carry, as (window, canvas), or None."""
        return None

    def after_forward(self, r: Request, w: Window) -> None:
        r.nfe += 1

    def apply(self, r: Request, w: Window, commit: torch.Tensor, tokens: torch.Tensor, extra=None) -> Applied:
        """Write one step's commits into r. extra: (window, canvas, commit, tokens) of the step's
        extra row for r, when it carried one."""
        if w.lo == w.hi:  # a prefill chunk: nothing scored
            return Applied([], None)
        committed = commit_block_step(r, w, commit, tokens)
        if r.holes is not None:  # a template: a stop token ends its hole (frontend/template.py)
            from ..frontend.template import close_holes
            committed += close_holes(r)
        return Applied(committed, end_block(r))


def commit_block_step(r: Request, w: Window, commit: torch.Tensor, tokens: torch.Tensor) -> list[int]:
    """Write a block step's commits into r's canvas; their positions relative to r.lo."""
    idx = commit.nonzero().flatten()
    r.canvas[w.lo + idx] = tokens[idx]
    r.step_in_block += 1
    if r.lookahead:
        r.draft = tokens[: w.hi - w.lo].clone()
    return (w.lo - r.lo + idx).tolist()


def end_block(r: Request) -> str | None:
    """If r's block is complete: "stop" or "length" when r is done, else move to the next block."""
    if not r.block_done():
        return None
    b, e = r.block
    if r.holes is None and bool(torch.isin(r.canvas[b:e], torch.tensor(list(r.stop_ids))).any()):
        return "stop"
    if r.span_idx + 1 >= len(r.spans):
        return "stop" if r.holes is not None else "length"
    r.span_idx += 1
    r.start_block()
    return None
