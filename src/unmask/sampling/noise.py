"""Turning logits into tokens: the pure pieces every decoding policy shares.

All of it works on any leading shape (`(..., vocab)`), so a batched engine and the one-request
reference call the same functions. Sampling is done in float64: Gumbel noise in low precision
rounds away the tail of the distribution, which cuts diversity and flatters perplexity.
"""
from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on `device`, seeded with `seed` (None: a fresh non-deterministic seed).

    The same seed gives the same stream on the same kind of device; CPU and CUDA streams differ.
    """
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def forbid_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """A copy of `logits` in which `token_id` can never be chosen (SUBS: never predict [MASK])."""
    out = logits.clone()
    out[..., token_id] = float("-inf")
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits and set the others to -inf (which of equal logits at the cut stays is
    torch.topk's choice); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = logits.topk(k, dim=-1, sorted=False).indices
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, keep, logits.gather(-1, keep))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `p`
    and set the others to -inf. The most likely token is always kept; equal logits are ranked by
    lower token id. `p >= 1` returns `logits` unchanged."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = sorted_logits.double().softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise, float64: -log(-log u), u ~ U[0, 1) drawn from `generator`."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u))  # u == 0 gives -inf (never chosen), never NaN


def gumbel_argmax(logits: torch.Tensor, temperature: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(logits / T) by the Gumbel-max trick: argmax(logits / T + g), in float64.

    This is LLaDA's `exp(logits) / (-log u)^T` in log space. T == 0 is plain argmax and draws no
    noise. Ties go to the lowest token id. Returns int64 of shape `logits.shape[:-1]`.
    """
    if temperature == 0:
        return logits.argmax(-1)
    noise = gumbel_noise(logits.shape, generator, logits.device)
    return (logits.double() / temperature + noise).argmax(-1)


def propose(logits: torch.Tensor, *, mask_id: int, temperature: float, top_p: float,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate token per position, and the confidence in it.

    logits: (..., vocab). [MASK] is never proposed. The token is sampled (T > 0) or taken greedily
    (T == 0) from the top-p filtered distribution. Its confidence is its float64 softmax probability
    under the model's own distribution (no noise, no temperature, no top-p; [MASK] excluded), which
    is what LLaDA's low-confidence remasking ranks by.

    Returns (tokens int64, confidence float64), both of shape `logits.shape[:-1]`.
    """
    logits = forbid_token(logits.double(), mask_id)
    tokens = gumbel_argmax(top_p_filter(logits, top_p), temperature, generator)
    probs = logits.softmax(-1)
    conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, conf


def select_topk(confidence: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (1-D, along the last dim of a 1-D input) of the `k` most confident candidates.

    Only positions where `candidates` is True compete. Equal confidences go to the lowest index,
    so the choice is deterministic.
    """
    conf = confidence.masked_fill(~candidates, float("-inf"))
    order = torch.sort(conf, descending=True, stable=True).indices
    return order[:k]
