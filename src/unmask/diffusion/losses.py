"""Training objectives, all on one code path: MDLM/LLaDA, block diffusion (BD3-LM) and AR.

Each loss returns the scalar to back-propagate plus the summed negative log-likelihood bound in nats
and the number of token positions it covers, so that evaluation can turn it into bits per byte.

SUBS parameterisation: the model never predicts [MASK] (its logit is -inf), and clean positions are
copied through, so they carry no loss.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.logit_shift import align_logits
from ..model.shift import block_left_context, left_context
from .masking import Noise, apply_mask, token_times
from .schedules import Schedule


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    nll: torch.Tensor  # summed NELBO (diffusion) or NLL (AR) in nats, detached
    tokens: int  # positions the bound is spread over


def _masked_ce(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)


def _reduce(per_token: torch.Tensor, loss_positions: torch.Tensor | None) -> LossOutput:
    """LLaDA normalisation over all B*L positions, or per-response normalisation for SFT."""
    if loss_positions is None:
        return LossOutput(per_token.sum() / per_token.numel(), per_token.detach().sum(), per_token.numel())
    lengths = loss_positions.sum(1).clamp(min=1)
    loss = (per_token.sum(1) / lengths).mean()
    return LossOutput(loss, per_token.detach().sum(), int(loss_positions.sum()))


def diffusion_masks(x0, noise: Noise, schedule: Schedule, block_size, prompt_mask, estimator: str, eps: float):
    if estimator == "count":
        return _count_masks(noise, x0.shape[1], block_size, prompt_mask, eps)
    if estimator != "time":
        raise ValueError(f"unknown estimator {estimator!r}; choose 'time' or 'count'")
    t_tok = token_times(noise.t, x0.shape[1], block_size).to(x0.device)
    masked = noise.u.to(x0.device) < schedule.mask_prob(t_tok)
    if prompt_mask is not None:
        masked = masked & ~prompt_mask
    return masked, schedule.weight(t_tok)


def _count_masks(noise: Noise, length: int, block_size, prompt_mask, eps: float):
    """The same NELBO, estimated by masking exactly k of a block's n eligible tokens, k uniform in
    1..n, with weight n/k on each masked token.

    Why: the continuous-time NELBO integrated over t is exactly this any-order sum (for every
    schedule), but drawing t and masking each token with probability t weights a token by 1/t, up
    to 1/eps = 1000. Drawing the count instead caps the weight at n (16 for BD3 block 16) and
    halves the per-token weight variance (H_n against log(1/eps)). k comes from the same
    stratified t (undoing the eps shift) and the subset from the ranks of the same uniforms, so
    the noise stream, its sharding across ranks and exact resume are unchanged.
    """
    u, t = noise.u, noise.t
    B = u.shape[0]
    bs = block_size or length
    nb = -(-length // bs)
    eligible = torch.ones_like(u, dtype=torch.bool) if prompt_mask is None else ~prompt_mask.to(u.device)
    # Ineligible and padding positions sort last, so the k smallest ranks are eligible tokens.
    uu = F.pad(u.masked_fill(~eligible, 2.0), (0, nb * bs - length), value=2.0).view(B, nb, bs)
    rank = uu.argsort(-1).argsort(-1)
    n = (uu < 2.0).sum(-1)  # (B, nb) eligible tokens per block
    v = ((t if t.dim() == 2 else t[:, None]).to(u.device) - eps) / (1.0 - eps)  # back to U[0, 1)
    k = torch.minimum(torch.floor(v * n).long() + 1, n)
    masked = (rank < k[..., None]) & (uu < 2.0)
    w = (n / k.clamp(min=1)).float()[..., None].expand(B, nb, bs)
    return masked.reshape(B, -1)[:, :length], w.reshape(B, -1)[:, :length]


def mdlm_loss(model, x0, noise: Noise, schedule: Schedule, mask_id: int, prompt_mask=None,
              estimator: str = "time", eps: float = 1e-3) -> LossOutput:
    """MDLM/LLaDA continuous-time NELBO with one t per sequence.

    prompt_mask (B, L) bool marks SFT prompt tokens: never noised, no loss; each response is then
    normalised by its own length.
    """
    masked, w = diffusion_masks(x0, noise, schedule, None, prompt_mask, estimator, eps)
    logits = mdlm_logits(model, x0, masked, mask_id)
    per = torch.where(masked, _masked_ce(logits, x0, mask_id) * w, 0.0)  # not `* masked`: inf * 0 = nan
    return _reduce(per, None if prompt_mask is None else ~prompt_mask)


def bd3_attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """The three-part mask over `x_t ⊕ x_0` (2L positions, noisy half first).

    noisy→noisy: same block only; noisy→clean: strictly earlier blocks; clean→clean: block-causal;
    clean→noisy: never (clean tokens must not see noise, or the cache would not be exact).
    """
    idx = torch.arange(2 * length, device=device)
    blk = (idx % length) // block_size
    noisy = idx < length
    qb, kb = blk[:, None], blk[None, :]
    qn, kn = noisy[:, None], noisy[None, :]
    return (qn & kn & (qb == kb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb))


@functools.lru_cache(maxsize=8)
def bd3_block_mask(length: int, block_size: int, device: str):
    """`bd3_attention_mask` as a FlexAttention BlockMask: tiles that are fully masked are skipped,
    which removes about half of the attention FLOPs of the doubled sequence."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, k):
        qn, kn = q < length, k < length
        qb, kb = (q % length) // block_size, (k % length) // block_size
        return (qn & kn & (qb == kb)) | (qn & ~kn & (kb < qb)) | (~qn & ~kn & (kb <= qb))

    return create_block_mask(allowed, None, None, 2 * length, 2 * length, device=device)


@functools.lru_cache(maxsize=8)
def bd3_additive_mask(length: int, block_size: int, device: str) -> torch.Tensor:
    """`bd3_attention_mask` as 0 / -inf: an additive float mask takes SDPA's fused CPU kernel, a bool
    one falls back to the math path (measured 1.6x slower per training step at L=1024). Cached: it
    is the same for every step of a run. Callers must not modify it."""
    allowed = bd3_attention_mask(length, block_size, device)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


def _logit_shift(model) -> int:
    """1 for families whose output at i scores token i + 1 (Dream, Fast-dLLM v2; config.logit_shift)."""
    return int(getattr(getattr(_unwrap(model), "config", None), "logit_shift", 0))


def _unwrap(model):
    """The Transformer under DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def mdlm_logits(model, x0, masked, mask_id: int) -> torch.Tensor:
    """(B, L, V) logits of a full-attention model on x0 with `masked` positions masked, position i
    scoring token i."""
    return align_logits(model(apply_mask(x0, masked, mask_id)), _logit_shift(model))


def bd3lm_logits(model, x0, masked, mask_id: int, block_size: int) -> torch.Tensor:
    """(B, L, V) logits of a block-diffusion model: one forward over `x_t ⊕ x_0` with the three-part
    mask, x_t being x0 with `masked` positions masked; position i scores token i."""
    L = x0.shape[1]
    xt = apply_mask(x0, masked, mask_id)
    pos = torch.arange(L, device=x0.device).repeat(2)
    if x0.device.type == "cuda":
        mask = bd3_block_mask(L, block_size, str(x0.device))
    else:  # FlexAttention has no CPU backward
        mask = bd3_additive_mask(L, block_size, str(x0.device))
    extra = {}
    net = _unwrap(model)
    if getattr(getattr(net, "config", None), "token_shift", False):
        # what inference sees left of each position: earlier blocks clean, this block as noised
        pad = net.config.pad_token_id
        prev_t, gap_t = block_left_context(xt, x0, mask_id, block_size, pad)
        prev_0, gap_0 = left_context(x0, mask_id, pad)
        extra = {"prev_idx": torch.cat([prev_t, prev_0], 1), "prev_gap": torch.cat([gap_t, gap_0], 1)}
    shift = _logit_shift(model)
    logits = model(torch.cat([xt, x0], dim=1), positions=pos, attn_mask=mask, logits_from=0,
                   logits_to=2 * L if shift else L, **extra)
    if shift:
        # A shifted family (Fast-dLLM v2) scores position i from the output at i - 1: inside a block
        # that is the noised copy; a block's first position is scored from the clean end of the
        # previous block (the x_0 half), as inference does.
        i = torch.arange(L, device=x0.device)
        src = torch.where(i % block_size == 0, L + i - 1, i - 1).clamp(min=0)
        logits = logits[:, src]
    return logits


def diffusion_logits(objective: str, model, x0, masked, mask_id: int, block_size: int) -> torch.Tensor:
    if objective == "mdlm":
        return mdlm_logits(model, x0, masked, mask_id)
    if objective == "bd3lm":
        return bd3lm_logits(model, x0, masked, mask_id, block_size)
    raise ValueError(f"not a diffusion objective: {objective!r}")


def bd3lm_loss(model, x0, noise: Noise, schedule: Schedule, mask_id: int, block_size: int,
               prompt_mask=None, estimator: str = "time", eps: float = 1e-3) -> LossOutput:
    """Block-diffusion NELBO: one t per block, one forward over `x_t ⊕ x_0` with the three-part mask."""
    masked, w = diffusion_masks(x0, noise, schedule, block_size, prompt_mask, estimator, eps)
    logits = bd3lm_logits(model, x0, masked, mask_id, block_size)
    per = torch.where(masked, _masked_ce(logits, x0, mask_id) * w, 0.0)  # not `* masked`: inf * 0 = nan
    return _reduce(per, None if prompt_mask is None else ~prompt_mask)


def ar_loss(model, x0, prompt_mask=None) -> LossOutput:
    """Next-token NLL under causal attention; position i predicts token i+1."""
    logits = model(x0[:, :-1])
    per = F.cross_entropy(logits.flatten(0, 1), x0[:, 1:].flatten(), reduction="none").view(x0.shape[0], -1)
    if prompt_mask is None:
        return _reduce(per, None)
    targets = ~prompt_mask[:, 1:]
    return _reduce(torch.where(targets, per, 0.0), targets)


def compute_loss(objective: str, model, x0, noise: Noise | None, schedule: Schedule | None,
                 mask_id: int, block_size: int, prompt_mask=None, estimator: str = "time",
                 eps: float = 1e-3) -> LossOutput:
    """estimator: how the diffusion NELBO is sampled ('time' or 'count', see `_count_masks`); both
    have the same expectation. eps: the lower end of t that the noise was drawn with."""
    if objective == "ar":
        return ar_loss(model, x0, prompt_mask)
    if objective == "mdlm":
        return mdlm_loss(model, x0, noise, schedule, mask_id, prompt_mask, estimator, eps)
    if objective == "bd3lm":
        return bd3lm_loss(model, x0, noise, schedule, mask_id, block_size, prompt_mask, estimator, eps)
    raise ValueError(f"unknown objective {objective!r}")
