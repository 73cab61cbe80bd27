"""Request schemas for the OpenAI-compatible API, plus our diffusion extensions.

Every model forbids unknown fields and validates strictly (no "5" for 5), so a typo in a field name
is a 400 rather than a silently ignored option. OpenAI fields that we accept but cannot honour are
declared (a client may send their defaults) and refused with a clear message when set to anything
else; see `unsupported()`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Stop = str | Annotated[list[str], Field(max_length=16)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by every generation endpoint."""

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, data):
        """Inception's client sends `extra_params` as a JSON object `extra_body`: its entries are
        taken as request fields (validated like any other; the request's own fields win)."""
        if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
            extra = data["extra_body"]
            data = {**extra, **{k: v for k, v in data.items() if k != "extra_body"}}
        return data

    model: str | None = Field(None, description="The served model's id (see /v1/models); optional.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate (the canvas length).")
    temperature: float | None = Field(None, ge=0, description="0 is greedy; default from the model.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Minus this for tokens already in the output.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Minus this x each token's count in the output.")
    repetition_penalty: float | None = Field(None, gt=0, description="CTRL's: prompt and output tokens' logits / by it.")
    top_k: int | None = Field(None, ge=-1, description="Sampling: the k most likely tokens only (-1 or 0: all).")
    logit_bias: dict[str, float] | None = None
    reasoning_effort: Literal["instant", "low", "medium", "high"] | None = Field(
        None, description="Mercury's: a decoding preset of the model (generation_config.json presets), from the "
                          "fastest commits (instant) to the most careful (high).")
    # Accepted and ignored (each named in the X-Unmask-Ignored response header when sent): hints about
    # scheduling, caching and reasoning summaries that do not change what this server writes.
    realtime: bool | None = None
    service_tier: str | None = None
    prediction: dict | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    modalities: list[Literal["text"]] | None = Field(None, description="Only [\"text\"]: this server writes text.")
    # diffusion extensions
    steps: int | None = Field(None, ge=1, description="Diffusion steps in total (topk policy).")
    threshold: float | None = Field(None, description="The policy's parameter: tau, f or gamma.")
    policy: Literal["topk", "threshold", "factor", "entropy", "margin", "learned"] | None = None
    fallback: Literal["best", "leftmost"] | None = Field(
        None, description="What a step commits when the policy picks no position: the one it ranks first, or "
                          "the leftmost masked one. Not for topk; default from the model.")
    block_size: int | None = Field(None, ge=1, description="Full-attention models only.")
    response_format: dict | None = Field(
        None, description="Structured output: OpenAI's {\"type\": \"json_schema\", \"json_schema\": {...}} or "
                          "{\"type\": \"json_object\"}, or our {\"type\": \"regex\" | \"choice\" | \"grammar\", ...}; "
                          "see docs/server.md.")
    diffusing: bool = Field(False, description="Stream the whole canvas at every step (needs stream).")
    remask: float | None = Field(None, ge=0, lt=1, description="Self-correction: each step checks one committed token "
                                 "of the current block with it hidden and sends it back to mask when the model's "
                                 "probability of it is below this (docs/server.md). Off when unset or 0.")


class _Healing(_Strict):
    """Text prompts only (chats are rendered by the template and never end in the user's whitespace)."""

    heal: bool = Field(True, description="Prompt healing: a prompt ending in a newline plus indentation is "
                                         "sent without it and the model rewrites it; false sends it as is.")


class TemplateHole(_Strict):
    hole: int = Field(..., ge=1, description="The most tokens the model may write in this hole.")


class CompletionRequest(_Sampling, _Healing):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1, max_length=1)] \
        | Annotated[list[list[int]], Field(min_length=1, max_length=1)] = Field(
            ..., description="Text or token ids; one prompt per request.")
    suffix: str | None = Field(None, description="Text after the gap: fill in the middle.")
    template: Annotated[list[str | TemplateHole], Field(min_length=1, max_length=512)] | None = Field(
        None, description="A template with holes after the prompt: text spans (strings) and {\"hole\": max_tokens}; "
                          "the model fills the holes and each choice lists them in `holes` (docs/templates.md).")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class FimRequest(_Sampling, _Healing):
    """Inception Mercury's /v1/fim/completions: the code before and after the cursor."""

    prompt: str
    suffix: str = ""


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call it answers


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning_summary: bool | None = None
    reasoning_summary_wait: bool | None = None


class EditMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart]


class EditRequest(_Sampling):
    """Inception Mercury's /v1/edit/completions: one user message with the tagged next-edit sections
    (frontend/edit.py); the answer is the code_to_edit region rewritten."""

    messages: Annotated[list[EditMessage], Field(min_length=1, max_length=1)]


# field -> the values that mean "not used", which we accept and ignore
_NEUTRAL = {
    "echo": (False,), "logprobs": (None, False, 0), "best_of": (None, 1), "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
}


# Fields we accept without acting on them; a request that sends one is answered with the header
# X-Unmask-Ignored naming them (docs/server.md has the table).
IGNORED = ("realtime", "service_tier", "prediction", "prompt_cache_key", "safety_identifier", "verbosity",
           "reasoning_summary", "reasoning_summary_wait", "metadata", "store", "user")


def ignored(req: BaseModel) -> list[str]:
    return [f for f in IGNORED if f in req.model_fields_set and getattr(req, f) is not None]


def unsupported(req: BaseModel) -> str | None:
    """The first OpenAI field that is set to something this server cannot do, if any."""
    for name, neutral in _NEUTRAL.items():
        if name in type(req).model_fields and getattr(req, name) not in neutral:
            return name
    return None


def content_text(content: str | list[ContentPart] | None) -> str | None:
    """A message's text: a string as is, text parts joined."""
    return content if content is None or isinstance(content, str) else "".join(p.text for p in content)


def chat_messages(req: ChatRequest) -> list[dict]:
    """The engine's chat prompt: text parts joined; OpenAI's 'developer' role is our 'system'; tool
    calls and tool results kept for the frontend (frontend/tools.py). Raises ValueError naming the
    message that is malformed."""
    out = []
    for i, m in enumerate(req.messages):
        content = content_text(m.content)
        if m.role == "tool" and not m.tool_call_id:
            raise ValueError(f"messages[{i}]: a tool message needs tool_call_id (the id of the call it answers)")
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise ValueError(f"messages[{i}].content is missing (only an assistant turn with tool_calls may omit it)")
        if m.tool_calls and m.role != "assistant":
            raise ValueError(f"messages[{i}]: only an assistant turn has tool_calls")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
