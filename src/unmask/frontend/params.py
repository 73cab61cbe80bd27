"""Per-request sampling parameters, resolved against the model's defaults and validated up front,
so a bad request is refused before it can touch the running batch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError
from ..sampling.policies import FALLBACKS, POLICIES, validate_fallback, validate_policy
from ..sampling.reference import Settings, resolve_settings

# The one parameter each policy takes, when neither the request nor generation_config sets it.
POLICY_DEFAULTS = {"topk": 0.0, "threshold": 0.9, "factor": 1.0, "entropy": 0.1, "margin": 0.9, "learned": 0.9}


@dataclass
class SamplingParams:
    """None means: take it from the model's generation_config.json."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    policy: str | None = None
    threshold: float | None = None  # tau (threshold, margin), f (factor) or gamma (entropy)
    fallback: str | None = None  # "best" or "leftmost": what a step commits when the rule picks nothing
    steps: int | None = None  # topk only: total diffusion steps (default: one per token)
    block_size: int | None = None  # full-attention models only; block models use their own
    stop: list[str] | str | None = None
    seed: int | None = None
    suffix: str | None = None  # fill-in-the-middle
    # A template with holes (frontend/template.py): text spans and Hole(max_tokens) / {"hole": n}
    # items after the prompt; the model fills the holes, the spans stay as given. max_tokens is then
    # the holes' budgets.
    template: list | None = None
    stream_canvas: bool = False  # stream the whole canvas at every step
    # Prompt healing (engine/healing.py): a text prompt ending in a newline plus indentation is sent
    # without that whitespace and the model rewrites it; the text comes back relative to the prompt.
    heal: bool = True
    # Structured output (unmask.structured): an OutputFormat, or OpenAI's response_format object
    # ({"type": "json_schema", ...}, json_object) or our regex / choice / grammar types.
    response_format: object | None = None
    # Mercury's reasoning_effort: "instant", "low", "medium" or "high" -> the model's decoding preset
    # (generation_config.json `presets`); an explicit policy / threshold / fallback / steps wins.
    reasoning_effort: str | None = None
    # Chat requests: OpenAI's function tools (frontend/tools.py); replies with calls are constrained
    # to declared functions and their parameter schemas.
    tools: list | None = None
    tool_choice: object | None = None  # "none", "auto" (default with tools), "required", or {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    top_k: int | None = None  # sampling: keep the k most likely tokens (None, 0 or -1: all)
    repetition_penalty: float | None = None  # CTRL's: logits of tokens in the prompt or output / by it (> 0)
    presence_penalty: float | None = None  # OpenAI's: minus this for each token already in the output
    frequency_penalty: float | None = None  # OpenAI's: minus this x the times a token is in the output
    # Self-correction (decode/remask.py): each step checks one committed token of the current block
    # with it hidden, and sends it back to mask when the model's probability of it is below this.
    remask: float | None = None


@dataclass(frozen=True)
class Resolved(Settings):
    """The reference sampler's settings plus what only the engine needs."""

    policy_id: int = 0
    threshold: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    fallback_id: int = 0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    remask: float = 0.0  # 0: off

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _effort(model, params: SamplingParams) -> SamplingParams:
    """params with the reasoning_effort preset filled in where the request left a field unset."""
    from ..config import EFFORTS

    effort = params.reasoning_effort
    if effort is None:
        return params
    if effort not in EFFORTS:
        raise UserError(f"reasoning_effort {effort!r}: choose one of {', '.join(EFFORTS)}")
    p = model.generation.preset(effort)
    # The preset's parameters belong to its policy: a caller who chose another policy keeps that
    # policy's own defaults (a threshold tau is not an entropy budget).
    own = params.policy is None or params.policy == (p.policy or model.generation.policy)
    if not own:
        return params
    return dataclasses.replace(params, policy=params.policy if params.policy is not None else p.policy,
                               threshold=params.threshold if params.threshold is not None else p.threshold,
                               fallback=params.fallback if params.fallback is not None else p.fallback,
                               steps=params.steps if params.steps is not None else p.steps)


def _penalties(params: SamplingParams) -> dict:
    top_k = params.top_k if params.top_k is not None else 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise UserError(f"top_k must be an integer >= 1 (or 0 / -1: no cut-off), got {params.top_k!r}")
    rep = 1.0 if params.repetition_penalty is None else float(params.repetition_penalty)
    if not 0 < rep < float("inf"):
        raise UserError(f"repetition_penalty must be a finite number > 0 (1 = off), got {params.repetition_penalty}")
    out = {"top_k": max(top_k, 0), "repetition_penalty": rep}
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(params, name)
        v = 0.0 if v is None else float(v)
        if not -2.0 <= v <= 2.0:
            raise UserError(f"{name} must be between -2 and 2, got {v}")
        out[name] = v
    return out


def resolve(model, params: SamplingParams, n_fixed: int) -> Resolved:
    gen = model.generation
    params = _effort(model, params)
    policy = params.policy if params.policy is not None else gen.policy
    validate_policy(policy, params.threshold)
    if policy == "learned" and getattr(model, "commit_rule", None) is None:
        raise UserError(f"the learned policy needs a commit rule stored with the model, and {model.path or 'this model'} "
                        "has none; train one with `unmask commit-rule --model DIR`, or choose another policy")
    s = resolve_settings(model, n_fixed, max_tokens=params.max_tokens, steps=params.steps,
                         block_size=params.block_size, temperature=params.temperature, top_p=params.top_p,
                         policy=policy, policies=tuple(POLICIES))
    if params.threshold is not None:
        threshold = float(params.threshold)
    elif policy == gen.policy:
        threshold = gen.threshold
    else:
        threshold = POLICY_DEFAULTS[policy]
    validate_policy(policy, threshold)
    fallback = params.fallback if params.fallback is not None else gen.fallback
    validate_fallback(fallback)
    stop = params.stop
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    else:
        if not all(isinstance(x, str) for x in stop):
            raise UserError("stop must be a string or a list of strings")
        stop = tuple(stop)
    if any(x == "" for x in stop):
        raise UserError("stop strings must not be empty")
    remask = 0.0 if params.remask is None else params.remask
    if isinstance(remask, bool) or not isinstance(remask, (int, float)) or not 0.0 <= remask < 1.0:
        raise UserError(f"remask must be a probability in [0, 1) (0 or unset: off), got {params.remask!r}")
    return Resolved(s.max_tokens, s.steps, s.block_size, s.temperature, s.top_p, policy, POLICIES[policy],
                    threshold, stop, FALLBACKS[fallback], **_penalties(params), remask=float(remask))
