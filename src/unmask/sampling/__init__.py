"""Decoding: the plain reference sampler and the pure pieces (noise, schedules, prompt layout) that
the engine's policies reuse."""
from .noise import forbid_token, gumbel_argmax, gumbel_noise, make_generator, propose, select_topk, top_p_filter
from .output import GenerationOutput
from .policies import POLICIES as POLICY_IDS
from .policies import (
    FALLBACKS, Proposal, StepParams, propose_batch, select_commits, step_k, validate_fallback, validate_policy,
)
from ..frontend.prompt import encode_prompt, layout_prompt
from .reference import POLICIES, Settings, reference_generate, resolve_settings
from .schedule import apportion, block_spans, num_transfer_tokens, steps_per_block

__all__ = [
    "FALLBACKS", "POLICIES", "POLICY_IDS", "GenerationOutput", "Proposal", "Settings", "StepParams", "apportion",
    "block_spans", "encode_prompt", "forbid_token", "gumbel_argmax", "gumbel_noise", "layout_prompt",
    "make_generator", "num_transfer_tokens", "propose", "propose_batch", "reference_generate",
    "resolve_settings", "select_commits", "select_topk", "step_k", "steps_per_block", "top_p_filter",
    "validate_fallback", "validate_policy",
]
