"""The OpenAI-compatible FastAPI app: routes, the request guard (API key, body size), lifespan.

    app = create_app(unmask.load(None), ServerConfig(api_key="..."))

The engine runs in one background thread (see bridge.py); every route here is async and only
waits on queues, so a slow forward pass never stalls the event loop.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..engine import Engine
from . import errors
from .bridge import EngineBridge
from .errors import APIError, error_response
from .generate import run
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, EditRequest, ErrorResponse, FimRequest, chat_messages, content_text
from ..errors import UserError
from ..frontend.edit import edit_task, parse_edit

log = logging.getLogger("unmask.server")
STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/fim/completions", "/v1/models", "/health",
             "/metrics", "/")
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 408, 413, 429)}


@dataclass
class ServerConfig:
    """Secure defaults: loopback only (the CLI's --host), bounded bodies, queues and generation."""

    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64  # requests beyond the running batch before 429
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int | None = None  # default: the model's context
    model_name: str | None = None  # default: the model directory's name
    url: str | None = None  # for the startup log line
    drain_timeout: float = 60.0  # shutdown waits this long for running requests


class State:
    """What the routes share. `pending` is only touched on the event loop, so it needs no lock."""

    def __init__(self, model, cfg: ServerConfig, engine: Engine | None):
        self.model, self.cfg = model, cfg
        self.model_name = cfg.model_name or (model.path.name if model.path else "unmask")
        self.engine = engine or Engine(model, max_batch=cfg.max_batch)
        self.metrics = Metrics()
        self.bridge = EngineBridge(self.engine, self.metrics)
        self.pending = 0
        self.max_pending = self.engine.max_batch + cfg.max_queue
        self.request_timeout = cfg.request_timeout
        ctx = model.config.max_seq_len
        self.max_tokens_limit = min(cfg.max_tokens_limit or ctx, ctx)
        self.mask_id = model.config.mask_token_id
        self.created = int(time.time())
        tok = model.tokenizer
        self.piece = functools.lru_cache(maxsize=65536)(lambda t: tok.decode([t], skip_special=False))


class Guard:
    """Pure ASGI middleware: API key and body size are checked before FastAPI parses anything, so an
    unauthenticated or oversized request costs no JSON parsing and gets no validation details."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state
        key = state.cfg.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = {}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self._guarded(scope, receive, send_, path)
        finally:
            self.state.metrics.http.labels(endpoint, str(status.get("code", 499))).inc()

    async def _guarded(self, scope, receive, send, path):
        if self.key is not None and (path.startswith("/v1/") or path == "/metrics") and not self._authorized(scope):
            r = error_response(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", None,
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return await r(scope, receive, send)
        limit = self.state.cfg.max_body_bytes
        too_big = error_response(413, f"the request body is over this server's limit of {limit} bytes", None,
                                 "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # chunked bodies carry no content-length: count as they arrive
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the disconnect, as handlers expect

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, self.key)


def create_app(model, cfg: ServerConfig | None = None, engine: Engine | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    st = State(model, cfg, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.bridge.start()
        where = f" at {cfg.url} (playground: {cfg.url}/)" if cfg.url else ""
        log.info("serving %s (%s) on %s%s", st.model_name, model.path or "in memory", model.device, where)
        yield
        if not await asyncio.to_thread(st.bridge.stop, cfg.drain_timeout):
            log.warning("the engine did not drain within %s s", cfg.drain_timeout)

    app = FastAPI(title="unmask", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for masked-diffusion language models. "
                              "See docs/server.md for the diffusion extensions.")
    app.state.unmask = st
    errors.install(app)
    app.add_middleware(Guard, state=st)

    @app.get("/health")
    async def health():
        ok = st.bridge.alive
        body = {"status": "ok" if ok else "error", "model": st.model_name, "device": str(model.device),
                "running": st.engine.num_running, "waiting": st.engine.num_waiting, "pending": st.pending}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": st.model_name, "object": "model", "created": st.created, "owned_by": "unmask",
            "max_model_len": model.config.max_seq_len, "attention": model.config.attention,
            "generation": model.generation.model_dump()}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        st.metrics.pending.set(st.pending)
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # OpenAI's batch form, with exactly one prompt
        return await run(request, st, "completion", body, prompt, body.suffix, body.max_tokens)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(request: Request, body: ChatRequest):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        try:
            messages = chat_messages(body)
        except ValueError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        return await run(request, st, "chat", body, messages, None, max_tokens)

    @app.post("/v1/fim/completions", responses=ERRORS)
    async def fim_completions(request: Request, body: FimRequest):
        return await run(request, st, "completion", body, body.prompt, body.suffix, body.max_tokens)

    @app.post("/v1/edit/completions", responses=ERRORS)
    async def edit_completions(request: Request, body: EditRequest):
        try:
            prefix, suffix = edit_task(parse_edit(content_text(body.messages[0].content)))
        except UserError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        return await run(request, st, "edit", body, prefix, suffix, body.max_tokens)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
