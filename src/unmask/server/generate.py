"""One generation request, from a validated body to an OpenAI-shaped answer (JSON or SSE).

Shapes: `text_completion` for /v1/completions and /v1/fim/completions, `chat.completion(.chunk)`
for chat. Our additions (documented in docs/server.md): `stats` next to `usage`, and with
`diffusing: true` a `canvas` object in every streamed choice.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import SamplingParams
from .errors import APIError, as_api_error, error_body
from .protocol import ignored, unsupported
from ..frontend.tools import split_calls
from ..structured import parse_response_format

MASK_PLACEHOLDER = "\u2591"  # what a still-masked position looks like in `canvas.text`


@dataclass
class Job:
    kind: str  # "completion" or "chat"
    rid: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    deadline: float
    done: bool = False
    events: int = 0
    role_sent: bool = False
    tools: bool = False  # a chat with tools: the reply may be tool calls (frontend/tools.py)
    text: str = ""  # with tools: the reply so far
    mode: str | None = None  # with tools: "text" once the reply is plain text, "calls" once it is calls
    last: object = field(default=None, repr=False)


class ClientGone(Exception):
    pass


def check(body, state, max_tokens: int | None) -> None:
    """Request-level checks the schema cannot express; raises APIError(400)."""
    if body.model is not None and body.model != state.model_name:
        raise APIError(400, f"model {body.model!r} does not exist; this server serves {state.model_name!r} "
                            "(see GET /v1/models)", "model", "model_not_found")
    if body.n != 1:
        raise APIError(400, f"n={body.n} is not supported; ask for one choice per request", "n", "unsupported")
    bad = unsupported(body)
    if bad is not None:
        raise APIError(400, f"{bad}={getattr(body, bad)!r} is not supported by this server; leave it unset",
                       bad, "unsupported")
    if max_tokens is not None and max_tokens > state.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens} but this server's limit is {state.max_tokens_limit}",
                       "max_tokens", "invalid_value")
    if body.diffusing and not body.stream:
        raise APIError(400, "diffusing streams the canvas, so it needs stream: true", "diffusing", "invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", "stream_options", "invalid_value")


def sampling_params(body, max_tokens: int | None, suffix: str | None) -> SamplingParams:
    template = getattr(body, "template", None)
    if template is not None:
        template = [s if isinstance(s, str) else {"hole": s.hole} for s in template]
    return SamplingParams(template=template,max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          policy=body.policy, threshold=body.threshold, fallback=body.fallback, steps=body.steps,
                          block_size=body.block_size, stop=body.stop, seed=body.seed, suffix=suffix,
                          stream_canvas=body.diffusing, heal=getattr(body, "heal", True),
                          response_format=parse_response_format(body.response_format), reasoning_effort=body.reasoning_effort,
                          top_k=body.top_k, repetition_penalty=body.repetition_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          remask=body.remask,
                          **_tool_fields(body))


def _tool_fields(body) -> dict:
    tools = getattr(body, "tools", None)
    if not tools:
        return {}
    choice = body.tool_choice
    return {"tools": [t.model_dump(exclude_none=True) for t in tools],
            "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else choice,
            "parallel_tool_calls": body.parallel_tool_calls}


async def run(request: Request, state, kind: str, body, prompt, suffix: str | None, max_tokens: int | None):
    check(body, state, max_tokens)
    if getattr(body, "template", None) is not None:
        total = sum(s.hole for s in body.template if not isinstance(s, str))
        if total > state.max_tokens_limit:
            raise APIError(400, f"template: its holes ask for {total} tokens in all but this server's limit is "
                                f"{state.max_tokens_limit}; lower the holes' budgets", "template", "invalid_value")
    elif max_tokens is None and state.max_tokens_limit < state.model.generation.max_tokens:
        max_tokens = state.max_tokens_limit  # the server's cap applies to the model's default too
    if state.pending >= state.max_pending:
        raise APIError(429, f"the server is at capacity ({state.pending} requests in flight); retry shortly",
                       None, "rate_limit_exceeded", {"Retry-After": "1"})
    prefix = {"chat": "chatcmpl", "edit": "edit"}.get(kind, "cmpl")
    job = Job(kind, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), state.model_name, body.stream,
              bool(body.stream_options and body.stream_options.include_usage),
              time.monotonic() + state.request_timeout,
              tools=bool(getattr(body, "tools", None)) and getattr(body, "tool_choice", None) != "none")
    state.pending += 1
    handed_off = False
    try:
        want = "all" if body.diffusing else "delta" if body.stream else "final"
        q = await state.bridge.submit(job.rid, prompt, sampling_params(body, max_tokens, suffix), want)
        skipped = ignored(body)
        headers = {"X-Unmask-Ignored": ", ".join(skipped)} if skipped else None
        if body.stream:
            handed_off = True
            return _SSE(_stream(job, q, state), lambda: _cleanup(job, state), headers)
        try:
            out = await _collect(job, q, request, state)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; keeps the access log honest
        return JSONResponse(_final(job, out, state), headers=headers)
    except Exception as e:  # CancelledError is not an Exception: it passes through untouched
        raise as_api_error(e) from None
    finally:
        if not handed_off:
            _cleanup(job, state)


def _cleanup(job: Job, state) -> None:
    if not job.done:
        state.bridge.abort(job.rid)
        job.done = True
    state.pending -= 1


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(job: Job, q: asyncio.Queue, request: Request, state):
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        while True:
            get = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({get, gone}, timeout=max(job.deadline - time.monotonic(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if gone in done:
                    raise ClientGone()
                raise _timeout(state)
            item = get.result()
            if isinstance(item, BaseException):
                job.done = True
                raise item
            if item.finished:
                job.done = True
                return _checked(item.output)
    finally:
        gone.cancel()


def _timeout(state) -> APIError:
    return APIError(408, f"the request did not finish within the server's timeout of {state.request_timeout:g} s; "
                         "lower max_tokens or raise the timeout", None, "request_timeout")


def _checked(out):
    if out.finish_reason == "error":
        raise APIError(500, "the engine failed while running this request", None, "engine_error")
    return out


def usage(out) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def holes(out) -> list[dict]:
    """A template's filled holes (our extension to the completion choice)."""
    return [{"text": h.text, "finish_reason": h.finish_reason, "tokens": len(h.token_ids)} for h in out.holes]


def stats(out) -> dict:
    return {"nfe": out.nfe, "tokens_per_forward": round(out.tokens_per_forward, 4),
            "seconds": round(out.seconds, 6), "ttft": None if out.ttft is None else round(out.ttft, 6),
            "tokens_per_second": round(out.completion_tokens / out.seconds, 3) if out.seconds > 0 else 0.0}


OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk"), "edit": ("edit.completion", "edit.completion.chunk"),
           "completion": ("text_completion", "text_completion")}


def _final(job: Job, out, state) -> dict:
    if job.kind in ("chat", "edit"):
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "finish_reason": out.finish_reason, "logprobs": None}
        if job.tools:
            content, calls = split_calls(out.text)
            if calls:
                choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls" if out.finish_reason == "stop" else out.finish_reason
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason, "logprobs": None}
        if out.holes is not None:
            choice["holes"] = holes(out)
    return {"id": job.rid, "object": OBJECTS[job.kind][0], "created": job.created, "model": job.model, "system_fingerprint": None, "choices": [choice],
            "usage": usage(out), "stats": stats(out)}


# ---- streaming ---------------------------------------------------------------------------------
class _SSE(StreamingResponse):
    """Runs `cleanup` however the response ends: finished, client gone, or never started."""

    def __init__(self, gen, cleanup, headers: dict | None = None):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(job: Job, q: asyncio.Queue, state):
    while True:
        try:
            item = await asyncio.wait_for(q.get(), max(job.deadline - time.monotonic(), 0))
        except TimeoutError:
            e = _timeout(state)
            yield _sse(error_body(e.status, e.message, e.param, e.code))
            break
        if isinstance(item, BaseException) or (item.finished and item.output.finish_reason == "error"):
            job.done = True
            e = as_api_error(item if isinstance(item, BaseException) else APIError(
                500, "the engine failed while running this request", None, "engine_error"))
            yield _sse(error_body(e.status, e.message, e.param, e.code))
            break
        job.events += 1
        if item.delta or item.canvas is not None or item.finished:
            yield _sse(_chunk(job, item, state))
        if item.finished:
            job.done = True
            if job.include_usage:
                yield _sse({**_head(job), "choices": [], "usage": usage(item.output), "stats": stats(item.output)})
            break
    yield "data: [DONE]\n\n"


def _head(job: Job) -> dict:
    return {"id": job.rid, "object": OBJECTS[job.kind][1],
            "created": job.created, "model": job.model, "system_fingerprint": None}


def _chunk(job: Job, ev, state) -> dict:
    reason = ev.output.finish_reason if ev.finished else None
    if job.kind in ("chat", "edit"):
        text = ev.delta
        if job.tools:  # plain text streams as it comes; calls are sent whole once the reply is done
            job.text += ev.delta
            if job.mode is None and job.text:
                job.mode = "calls" if job.text.startswith("<") else "text"
            text = ev.delta if job.mode == "text" else ""
        delta = {"content": text}
        if not job.role_sent:
            delta, job.role_sent = {"role": "assistant", "content": text}, True
        if job.tools and job.mode == "calls" and ev.finished:
            content, calls = split_calls(job.text)
            delta["content"] = content  # held back while it could have been calls: all of it now
            if calls:
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
                reason = "tool_calls" if reason == "stop" else reason
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": ev.delta, "finish_reason": reason, "logprobs": None}
        if ev.finished and ev.output.holes is not None:
            choice["holes"] = holes(ev.output)
    if ev.canvas is not None:
        choice["canvas"] = render_canvas(ev, job.events, state)
    out = {**_head(job), "choices": [choice]}
    if ev.finished and not job.include_usage:
        out["usage"], out["stats"] = usage(ev.output), stats(ev.output)
    return out


def render_canvas(ev, step: int, state) -> dict:
    """The generated region at this step: masked positions are null in `tokens` and the placeholder in
    `text`; `committed` lists the positions this step committed (all other non-null ones were earlier)."""
    mask_id, piece = state.mask_id, state.piece
    tokens = [None if t == mask_id else piece(t) for t in ev.canvas]
    out = {"step": step, "tokens": tokens, "committed": ev.committed or [],
            "text": "".join(MASK_PLACEHOLDER if t is None else t for t in tokens),
            "masked": sum(t is None for t in tokens)}
    if ev.revised:  # remask: positions this step sent back to mask (their tokens above are null again)
        out["revised"] = list(ev.revised)
    if ev.holes is not None:  # a template: the holes' spans in `tokens` (the rest is its fixed text)
        out["holes"] = [list(h) for h in ev.holes]
    return out
