"""The plain reference sampler: LLaDA-style low-confidence remasking, one request, no cache.

Slow on purpose: every step is a full forward of the whole canvas, so there is nothing to get
wrong. The engine is tested token-for-token against it.

The procedure (full and block attention):
  canvas = head + [MASK] * max_tokens + tail            (see prompt.layout_prompt)
  cut the generated region into blocks at absolute multiples of the block size
  share the steps among the blocks (schedule.steps_per_block)
  for each block, left to right:
      for k in num_transfer_tokens(masks in block, its steps):
          logits = net(canvas) on the block's positions           (one forward, nfe += 1)
          token, confidence = propose(logits)                     (noise.propose)
          commit the k most confident still-masked positions of the block
      stop after this block if it holds EOS
Causal (AR) models generate one token per forward from the last position's logits.

Noise order (for reproducing a seeded run): each forward draws one float64 uniform tensor of shape
(positions in the current block's generated span, vocab) — (1, vocab) for causal models — from a
`torch.Generator` on the model's device seeded with `seed`. Nothing is drawn at temperature 0.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..decode.plans import model_logit_shift
from ..errors import UserError
from .noise import make_generator, propose, select_topk
from .output import GenerationOutput
from ..frontend.prompt import layout_prompt
from .schedule import block_spans, num_transfer_tokens, steps_per_block

if TYPE_CHECKING:
    from ..pretrained import Pretrained

POLICIES = ("topk",)


@dataclass(frozen=True)
class Settings:
    """Decoding settings after defaults and validation."""

    max_tokens: int
    steps: int
    block_size: int
    temperature: float
    top_p: float
    policy: str


def resolve_settings(model: Pretrained, n_fixed: int, *, max_tokens=None, steps=None, block_size=None,
                     temperature=None, top_p=None, policy=None, policies=POLICIES) -> Settings:
    """Fill None from `model.generation` and check every value; raises UserError.

    n_fixed: how many canvas tokens are given (prompt, FIM markers and suffix).
    With max_tokens left as None, the default is lowered to what fits in the context.
    For block-attention models the block size is the model's own (`config.block_size`); a
    different requested one is ignored, since the model was trained on that partition.
    """
    gen, cfg = model.generation, model.config
    policy = gen.policy if policy is None else policy
    if policy not in policies:
        raise UserError(f"unknown policy {policy!r}; choose one of: {', '.join(policies)}")

    ctx = cfg.max_seq_len
    room = ctx - n_fixed
    if max_tokens is None:
        max_tokens = min(gen.max_tokens, room) if room >= 1 else gen.max_tokens
    elif max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}; pass --max-tokens 1 or more")
    if n_fixed + max_tokens > ctx:
        if room < 1:
            raise UserError(f"the prompt is {n_fixed} tokens but the model's context is {ctx} tokens, "
                            "leaving no room to generate; shorten the prompt")
        raise UserError(f"the prompt is {n_fixed} tokens and max_tokens is {max_tokens}, but the model's "
                        f"context is {ctx} tokens; shorten the prompt or lower --max-tokens "
                        f"(at most {room} here)")

    steps = gen.steps if steps is None else steps
    steps = max_tokens if steps is None else steps
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")

    if cfg.attention == "block":
        block_size = cfg.block_size
    else:
        block_size = gen.block_size if block_size is None else block_size
    if block_size < 1:
        raise UserError(f"block_size must be at least 1, got {block_size}")

    temperature = gen.temperature if temperature is None else float(temperature)
    if not temperature >= 0 or math.isinf(temperature):  # also rejects NaN
        raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    top_p = gen.top_p if top_p is None else float(top_p)
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    return Settings(max_tokens, steps, block_size, temperature, top_p, policy)


@torch.inference_mode()
def reference_generate(model: Pretrained, prompt: str | Sequence[int] | Sequence[dict], *,
                       max_tokens: int | None = None, steps: int | None = None,
                       block_size: int | None = None, temperature: float | None = 0.0,
                       top_p: float | None = 1.0, policy: str | None = "topk",
                       suffix: str | None = None, seed: int | None = None) -> GenerationOutput:
    """Generate one completion for `prompt` (text, token ids, or a chat) with `model` (a Pretrained).

    None arguments fall back to `model.generation`. `suffix` asks for fill-in-the-middle.
    `steps` is the total number of diffusion steps (default: one per token); it is ignored by
    causal models, which take one step per token. `seed` makes temperature sampling reproducible.
    """
    t0 = time.perf_counter()
    cfg, net = model.config, model.net
    head, tail = layout_prompt(model, prompt, suffix)
    s = resolve_settings(model, len(head) + len(tail), max_tokens=max_tokens, steps=steps,
                         block_size=block_size, temperature=temperature, top_p=top_p, policy=policy)
    shift = model_logit_shift(cfg)
    if shift and not head:
        raise UserError("the prompt is empty; this model scores each position from the one before it, "
                        "so it needs at least one prompt token")

    device = model.device
    lo, hi = len(head), len(head) + s.max_tokens
    canvas = torch.tensor(head + [cfg.mask_token_id] * s.max_tokens + tail, dtype=torch.long, device=device)
    generator = make_generator(seed, device) if s.temperature > 0 else None
    pick = dict(mask_id=cfg.mask_token_id, temperature=s.temperature, top_p=s.top_p, generator=generator)

    nfe = 0
    if cfg.attention == "causal":
        for i in range(lo, hi):
            logits = net(canvas[None, :i], logits_from=i - 1)[0]  # (1, vocab): position i-1 predicts i
            nfe += 1
            token, _ = propose(logits, **pick)
            canvas[i] = token[0]
            if int(token[0]) == cfg.eos_token_id:
                break
    else:
        spans = block_spans(lo, hi, s.block_size)
        plan = steps_per_block([e - b for b, e in spans], s.steps)
        for (b, e), n_steps in zip(spans, plan):
            for k in num_transfer_tokens(e - b, n_steps):
                # (e - b, vocab); a shifted family's output at p scores p + 1 (Dream, Fast-dLLM v2)
                logits = net(canvas[None], logits_from=b - shift, logits_to=e - shift)[0]
                nfe += 1
                tokens, conf = propose(logits, **pick)
                chosen = select_topk(conf, canvas[b:e] == cfg.mask_token_id, k)
                canvas[b + chosen] = tokens[chosen]
            if bool((canvas[b:e] == cfg.eos_token_id).any()):
                break

    generated = canvas[lo:hi].tolist()
    stopped = cfg.eos_token_id in generated
    ids = generated[: generated.index(cfg.eos_token_id)] if stopped else generated
    text = model.tokenizer.decode(ids, skip_special=True)
    return GenerationOutput(
        text=text,
        token_ids=ids,
        nfe=nfe,
        seconds=time.perf_counter() - t0,
        finish_reason="stop" if stopped else "length",
        prompt_tokens=len(head) + len(tail),
        completion_tokens=len(ids),
    )
