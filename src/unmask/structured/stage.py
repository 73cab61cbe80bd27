"""The grammar stage: between the forward and the commit, for requests with a response format.

A grammar is a left-to-right automaton, and a diffusion step proposes many positions at once. For a
constrained row the stage keeps the committed output a prefix (so the matcher consumes exactly what
is written) and, per step, walks from the leftmost open position to the right:

  - tokens the grammar forces (keys, punctuation) are written whatever the model proposed;
  - the first free position always gets a token: the model's proposal if the grammar allows it,
    else the model's best (or, sampling, a fresh draw) among the allowed tokens;
  - each later position is written only if the request's policy committed it this step AND its
    proposal is allowed after what precedes it; the walk stops at the first that is not (that
    position and everything right of it stay masked and are proposed again next step);
  - when the positions left are what the grammar's closing walk needs, the walk is written instead
    (state.py), so the output is complete before max_tokens; when the grammar is complete (or the
    model ends an accepting output), EOS fills the rest of the window.

So a step still commits several tokens whenever the model's parallel proposals are valid, and an
output that ends with EOS is complete under its grammar (EOS is only written in an accepting state). Unconstrained rows of the same batch are not touched.
"""
from __future__ import annotations

import torch

from ..sampling.noise import gumbel_argmax, top_k_filter, top_p_filter


def _choose(r, logits: torch.Tensor, allowed: torch.Tensor) -> int:
    """The model's token among the allowed ones: argmax, or a draw from the request's generator."""
    x = logits.double().masked_fill(~allowed.to(logits.device), float("-inf"))
    if r.s.temperature == 0:
        return int(x.argmax())
    x = top_p_filter(top_k_filter(x, r.s.top_k), r.s.top_p)
    return int(gumbel_argmax(x, r.s.temperature, r.generator))


def _fits(g, token: int, room: int) -> bool:
    """After `token`, can the output still be finished in `room` positions (EOS included)? True
    when the closing walk cannot tell (the token is valid; refusing it would not help)."""
    need = g.need_after(token)
    return need is None or need <= room


def constrain(r, w, logits: torch.Tensor, masked: torch.Tensor, commit: torch.Tensor, tokens: torch.Tensor,
              eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This row's commits and tokens under r.constraint (see the module docstring). logits: (A, V)
    for the scored positions w.lo.., masked / commit / tokens: (A,) as the policy left them."""
    g = r.constraint
    out_commit = torch.zeros_like(commit)
    out_tokens = tokens.clone()
    A = int(masked.shape[0])
    start = max(r.lo - w.lo, 0)
    open_ = masked[start:].nonzero()
    if not len(open_):
        return out_commit, out_tokens
    j = start + int(open_[0])
    first = True

    def write(t: int) -> None:
        nonlocal j, first
        out_tokens[j], out_commit[j] = t, True
        j, first = j + 1, False

    def end() -> None:  # EOS here and in every open position right of it in this window
        while j < A and bool(masked[j]):
            write(eos_id)

    while j < A and bool(masked[j]):
        left = r.hi - (w.lo + j)  # positions left to this request, this one included
        proposed = int(tokens[j])
        takes = first or bool(commit[j])
        if g.stopped and not g.accepting:  # llguidance's error state: nothing valid can follow
            raise RuntimeError(f"the grammar reached a dead end: {g.matcher.get_error() or 'no token allowed'}")
        if g.stopped or (g.accepting and takes and proposed in r.stop_ids):
            end()
            break
        need = g.need()
        if need is not None and need >= left:  # no room left for the model's choices
            path = g.closing()
            if path:  # the closing walk, followed token by token (its need falls by one each)
                g.consume(path[0])
                write(path[0])
                continue
            if g.accepting:
                end()
                break
        forced = g.forced()
        if forced:
            t = forced[0]
            if not _fits(g, t, left - 1):  # the walk from here starts with the same forced tokens
                t = (g.closing() or [t])[0]
            g.consume(t)
            write(t)
            continue
        if not takes:
            break
        t = proposed
        if t in r.stop_ids or not g.valid(t):
            if not first:
                break
            t = _choose(r, logits[j], torch.from_numpy(g.allowed()))
        if t == eos_id or t in r.stop_ids:
            end()
            break
        if not _fits(g, t, left - 1):
            if not first:
                break
            path = g.closing()
            if path:
                t = path[0]
            elif g.accepting:
                end()
                break
        g.consume(t)
        write(t)
    return out_commit, out_tokens


class _HoleView:
    """A request seen as one of its template's holes: `constrain` reads lo, hi and constraint here,
    everything else (sampling settings, generator, stop ids) from the request."""

    def __init__(self, r, lo: int, hi: int, g):
        self._r, self.lo, self.hi, self.constraint = r, lo, hi, g

    def __getattr__(self, name):
        return getattr(self._r, name)


def constrain_holes(r, w, logits: torch.Tensor, masked: torch.Tensor, commit: torch.Tensor, tokens: torch.Tensor,
                    eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`constrain` for each hole of a one-canvas template that has a grammar (structured/layout.py):
    each hole is a committed prefix of its own under its own grammar, all decoded in the same step;
    positions outside them keep the policy's commits."""
    out_commit, out_tokens = commit.clone(), tokens.clone()
    A = int(masked.shape[0])
    for (a, b), g in zip(r.holes, r.hole_constraints):
        lo, hi = max(a - w.lo, 0), min(b - w.lo, A)
        if g is None or lo >= hi:
            continue
        m = torch.zeros_like(masked)
        m[lo:hi] = masked[lo:hi]
        c, t = constrain(_HoleView(r, a, b, g), w, logits, m, commit, tokens, eos_id)
        out_commit[lo:hi], out_tokens[lo:hi] = c[lo:hi], t[lo:hi]
    return out_commit, out_tokens
