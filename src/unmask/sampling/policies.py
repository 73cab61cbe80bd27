"""Batched decoding policies: which masked positions a step commits, for many requests at once.

Pure functions of (logits, state), for a continuous-batching engine that runs one forward per step
over B requests, each with a window of T query positions (its current block; a row may have fewer
real positions). Every request has its own policy and parameters; a step is one call of
`propose_batch` and one of `select_commits` for the whole batch.

  prop   = propose_batch(logits, mask_id, temperature, top_p, generators, valid)
  commit = select_commits(prop, masked, params)        # (B, T) bool, a subset of `masked`
  canvas[commit] = prop.tokens[commit]

Row independence: a row's tokens and commits never depend on the other rows of the batch (greedy
rows are computed by the same per-row reductions; a sampling row draws its noise from its own
generator). The topk policy with `step_k` makes the same choices as `reference_generate`.

Noise (temperature > 0): each sampling row draws, per call, ONE float64 uniform tensor of shape
(n_valid, vocab) from its own generator, where n_valid is the number of True entries in its row of
`valid` (T when `valid` is None). Row i of that draw belongs to the i-th valid position, in
position order. This is exactly the reference's draw of (positions in the current block's generated
span, vocab) per forward, provided the row's valid positions are that span. Greedy rows draw nothing.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from .noise import gumbel_argmax, top_k_filter, top_p_filter

POLICIES = {"topk": 0, "threshold": 1, "factor": 2, "entropy": 3, "margin": 4, "learned": 5}
TOPK, THRESHOLD, FACTOR, ENTROPY, MARGIN, LEARNED = (
    POLICIES[n] for n in ("topk", "threshold", "factor", "entropy", "margin", "learned"))
# What a step commits when its rule picks no position (every policy but topk): the position the rule
# ranks first (Fast-dLLM), or the leftmost masked one, i.e. the token an AR model would write next.
FALLBACKS = {"best": 0, "leftmost": 1}
BEST, LEFTMOST = FALLBACKS["best"], FALLBACKS["leftmost"]


def validate_fallback(name: str) -> None:
    if name not in FALLBACKS:
        raise UserError(f"unknown fallback {name!r}; choose one of: {', '.join(FALLBACKS)}")


def validate_policy(name: str, threshold: float | None) -> None:
    """Raise UserError (one line) for an unknown policy or a parameter out of range.

    `threshold` carries each policy's one parameter: tau in (0, 1] for threshold and margin, the
    factor f > 0 for factor, the entropy budget gamma > 0 for entropy; topk ignores it. None means
    "use the model's default" and is accepted.
    """
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    if threshold is None or name == "topk":
        return
    t = float(threshold)
    if name in ("threshold", "margin", "learned"):
        if not 0 < t <= 1:  # also rejects NaN
            raise UserError(f"threshold must be in (0, 1] for the {name} policy, got {threshold}; "
                            "pass e.g. --threshold 0.9")
    elif name == "factor":
        if not t > 0 or math.isinf(t):
            raise UserError(f"the factor policy needs a finite factor f > 0 (passed as threshold), got "
                            f"{threshold}; pass e.g. --threshold 1.0")
    elif name == "entropy":
        if not t > 0 or math.isinf(t):
            raise UserError(f"the entropy policy needs a finite entropy budget gamma > 0 (passed as "
                            f"threshold), got {threshold}; pass e.g. --threshold 0.1")


@dataclass
class StepParams:
    """Per-request decoding parameters for one step: one row per request, on the logits' device."""

    policy: torch.Tensor       # (B,) int64 ids from POLICIES
    k: torch.Tensor            # (B,) int64: tokens topk commits this step (see step_k); others ignore it
    threshold: torch.Tensor    # (B,) float64: tau (threshold, margin), f (factor), gamma (entropy)
    temperature: torch.Tensor  # (B,) float64
    top_p: torch.Tensor        # (B,) float64
    fallback: torch.Tensor | None = None  # (B,) int64 ids from FALLBACKS; None: "best" for every row
    rule: object | None = None  # the model's CommitRule (sampling/commit_rule.py), for the learned policy


@dataclass
class Proposal:
    """One candidate per position. All (B, T); confidence/margin/entropy are float64 and describe the
    model's own distribution with [MASK] removed (no temperature, no top-p), as in `noise.propose`."""

    tokens: torch.Tensor      # int64
    confidence: torch.Tensor  # p(chosen token)
    margin: torch.Tensor      # p(top1) - p(top2)
    entropy: torch.Tensor     # nats


def propose_batch(logits: torch.Tensor, mask_id: int, temperature: torch.Tensor, top_p: torch.Tensor,
                  generators: Sequence[torch.Generator | None], valid: torch.Tensor | None = None,
                  need_margin: bool = True, need_entropy: bool = True,
                  allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  top_k: Sequence[int] | None = None) -> Proposal:
    """Candidate tokens and their statistics for a batch of windows.

    logits: (B, T, V), any float dtype (computed in float64). temperature, top_p: (B,) (tensors or
    sequences of floats). generators: B entries; a row with temperature > 0 uses its own (None: the
    global default generator, which is not batch-invariant). valid: optional (B, T) bool of real
    positions; it only decides how much noise a sampling row draws (see the module docstring), and
    what is proposed at invalid positions is unspecified.
    need_margin / need_entropy: False skips those full-vocabulary reductions (zeros are returned);
    pass False when no row of the batch uses the margin / entropy policy.
    allowed: optional (rows, cols, ok): at logits[rows[j], cols[j]] only the tokens where ok[j] (V,)
    is True may be proposed (a logit mask applied before everything else, so the statistics describe
    the constrained distribution). The engine uses it for prompt healing's first position.
    top_k: optional (B,) ints: a sampling row keeps only its k most likely tokens before top-p (0: all).

    Greedy rows (temperature 0) take the argmax (ties to the lowest id; top-p cannot change it) and
    never loop in Python. Sampling rows are looped over: top-p filter, then the Gumbel-max in float64,
    by the very functions the reference calls (`noise.top_p_filter`, `noise.gumbel_argmax`) on the
    row's valid positions, so the result is bit-identical to the reference given the same logits.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V < 2:
        raise ValueError(f"need a vocabulary of at least 2 (a token besides [MASK]), got {V}")
    if len(generators) != B:
        raise ValueError(f"need one generator entry per row: {len(generators)} for {B} rows")
    lg = logits.to(torch.float64, copy=True)
    lg[..., mask_id] = float("-inf")  # SUBS: [MASK] is never proposed, and carries no probability
    if allowed is not None:
        rows, cols, ok = (t.to(lg.device) for t in allowed)
        lg[rows, cols] = lg[rows, cols].masked_fill(~ok, float("-inf"))
    probs = lg.softmax(-1)
    tokens = lg.argmax(-1)

    temp = torch.as_tensor(temperature, dtype=torch.float64).reshape(B).cpu()
    sampling = (temp > 0).nonzero().flatten().tolist()
    if sampling:
        p_cpu = torch.as_tensor(top_p, dtype=torch.float64).reshape(B).cpu()
        valid_cpu = None if valid is None else valid.to("cpu", torch.bool)
        for r in sampling:
            pos = None if valid_cpu is None else valid_cpu[r].nonzero().flatten().to(lg.device)
            row = lg[r] if pos is None else lg[r, pos]
            if row.shape[0] == 0:
                continue
            if top_k is not None and top_k[r] > 0:
                row = top_k_filter(row, int(top_k[r]))
            picked = gumbel_argmax(top_p_filter(row, float(p_cpu[r])), float(temp[r]), generators[r])
            if pos is None:
                tokens[r] = picked
            else:
                tokens[r, pos] = picked

    confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if need_margin:
        top2 = probs.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
    else:
        margin = torch.zeros_like(confidence)
    if need_entropy:
        entropy = torch.special.entr(probs).sum(-1)  # entr(0) == 0: the forbidden [MASK] adds nothing
    else:
        entropy = torch.zeros_like(confidence)
    return Proposal(tokens, confidence, margin, entropy)


def _count_prefix(ok: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True along the last dim: (B, T) bool -> (B,) int64."""
    return ok.to(torch.int64).cummin(-1).values.sum(-1)


def select_commits(prop: Proposal, masked: torch.Tensor, params: StepParams,
                   used: Collection[int] | None = None) -> torch.Tensor:
    """Which positions to commit this step: (B, T) bool, a subset of `masked`.

    Each rule ranks a row's masked positions (ties to the lowest position) and commits a leading
    run of n of them:
      topk      n = k                                              (rank by confidence)
      threshold n = #{confidence >= tau}                           (rank by confidence)
      factor    n = largest with c_j >= 1 - f/(j+1) for all j <= n (rank by confidence; j 1-indexed)
      entropy   n = largest with e_1 + ... + e_n <= gamma           (rank by entropy, ascending)
      margin    n = #{margin >= tau}                               (rank by margin)
      learned   n = #{p_final >= tau}     (rank by p_final, the learned commit rule's score)
    then n is clipped to [1, n_masked] (every row with a masked position makes progress; one with none
    commits nothing). A row whose rule gave n = 0 commits the position ranked first, or, with the
    "leftmost" fallback (not for topk), its leftmost masked position instead. The rules are computed
    for all rows with static shapes and no host sync, and each row keeps its own policy's result.
    used: the policy ids present in params.policy (None: assume all). Only those rules and rankings
    are computed: each costs a few dozen small tensor ops, which at batch 1 add up to a sizeable
    share of a CPU decode step. A row whose policy is not in `used` gets an unspecified result.
    """
    B, T = masked.shape
    dev = masked.device
    used = set(POLICIES.values()) if used is None else set(used)
    if params.rule is None:
        used.discard(LEARNED)  # no rule to score with (requests cannot ask for it: frontend/params.py)
    if not used:
        return torch.zeros_like(masked)
    policy = params.policy.to(dev).view(B, 1)
    thr = params.threshold.to(dev, torch.float64).view(B, 1)
    n_masked = masked.sum(-1)
    ranks = torch.arange(T, device=dev)
    in_range = ranks.view(1, T) < n_masked.view(B, 1)  # sorted slot j holds a masked position
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)

    def rank(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked positions by descending score (stable: ties to the lowest position), then the rest."""
        key = torch.where(masked, score.to(torch.float64), neg_inf)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        return order, score.to(torch.float64).gather(-1, order)

    def n_factor(conf_sorted):
        bound = 1.0 - thr / (ranks.view(1, T) + 2).to(torch.float64)  # j = slot + 1: 1 - f / (j + 1)
        return _count_prefix(in_range & (conf_sorted >= bound))

    def n_entropy(neg_ent_sorted):
        cum_ent = torch.where(in_range, -neg_ent_sorted, torch.zeros_like(neg_ent_sorted)).cumsum(-1)
        return (in_range & (cum_ent <= thr)).sum(-1)

    def n_above(srt):
        return (in_range & (srt >= thr)).sum(-1)

    scores = {"confidence": lambda: prop.confidence, "margin": lambda: prop.margin, "entropy": lambda: -prop.entropy,
              "learned": lambda: params.rule.score(prop.confidence, prop.margin, prop.entropy, masked)}
    # policy id -> (the score it ranks by, n from the sorted scores)
    rules = {TOPK: ("confidence", lambda _: params.k.to(dev, torch.int64)), THRESHOLD: ("confidence", n_above),
             FACTOR: ("confidence", n_factor), ENTROPY: ("entropy", n_entropy), MARGIN: ("margin", n_above),
             LEARNED: ("learned", n_above)}
    rankings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n = order = None
    p = policy.view(B)
    for pid in sorted(used):
        key, count = rules[pid]
        if key not in rankings:
            rankings[key] = rank(scores[key]())
        by, srt = rankings[key]
        if n is None:  # the first rule fills every row; the others overwrite their own rows
            n, order = count(srt), by
        else:
            n = torch.where(p == pid, count(srt), n)
            order = torch.where(policy == pid, by, order)
    picked_none = n == 0
    n = torch.minimum(n.clamp(min=1), n_masked)  # n_masked == 0 -> 0

    take_sorted = ranks.view(1, T) < n.view(B, 1)
    commit = torch.zeros_like(masked).scatter(-1, order, take_sorted)
    if params.fallback is None:
        return commit
    leftmost = picked_none & (p != TOPK) & (params.fallback.to(dev).view(B) == LEFTMOST)
    first_masked = masked & (masked.to(torch.int64).cumsum(-1) == 1)
    return torch.where(leftmost.view(B, 1), first_masked, commit)


def step_k(n_masked_at_block_start: torch.Tensor, steps_for_block: torch.Tensor,
           step_index_in_block: torch.Tensor) -> torch.Tensor:
    """Tokens the topk policy commits at a step: the vectorised twin of `schedule.num_transfer_tokens`.

    k[b] == num_transfer_tokens(n[b], steps[b])[i[b]]: the block's n masks spread evenly over
    min(steps, n) steps, the first steps taking the remainder. Steps are clamped to >= 1 (the scalar
    version raises instead), and an index past the block's last step gives 0.
    """
    n = n_masked_at_block_start.to(torch.int64)
    s = steps_for_block.to(torch.int64).clamp(min=1)
    i = step_index_in_block.to(torch.int64)
    s = torch.where(n > 0, torch.minimum(s, n), torch.ones_like(s))
    base = torch.div(n, s, rounding_mode="floor")
    rem = n - base * s
    k = base + (i < rem).to(torch.int64)
    return torch.where((i >= 0) & (i < s), k, torch.zeros_like(k))
