"""OpenAI's error JSON, and the mapping of every failure to it.

Anything the client sent wrong is a 4xx with a message that says what and where; only our own bugs
are 5xx (the catch-all handler), so a fuzzer finding a 5xx has found a bug.
"""
from __future__ import annotations

import json
import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .bridge import EngineFailure, ShuttingDown

log = logging.getLogger("unmask.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def as_api_error(e: BaseException) -> APIError:
    """Errors that come back from the engine thread."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, str(e), _param_of(str(e)), "invalid_value")
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(e, EngineFailure):
        return APIError(500, str(e), code="engine_error")
    log.error("unexpected error:\n%s", "".join(traceback.format_exception(e)))
    return APIError(500, "internal server error", code="internal_error")


def _param_of(message: str) -> str | None:
    """Engine messages name the field they are about first (`max_tokens must ...`); point `param` at it."""
    if message.startswith(("the prompt", "prompt")):
        return "prompt"
    if message.startswith("response_format"):
        return message.split(" ", 1)[0].rstrip(":")
    for name in ("template", "remask", "max_tokens", "threshold", "temperature", "top_p", "steps", "block_size", "stop", "suffix",
                 "messages"):
        if message.startswith(name):
            return name
    if "policy" in message:
        return "policy"
    return None


def _describe(err: dict) -> tuple[str, str | None]:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        ctx = err.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({ctx})", None
    if err.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}; it is neither an OpenAI field nor one of ours", ".".join(loc)
    if err.get("type") == "missing":
        return f"{'.'.join(loc)}: field required", ".".join(loc)
    where = ".".join(loc) or "body"
    return f"{where}: {err.get('msg', 'invalid value')}", ".".join(loc) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(UserError)
    async def _user(request: Request, e: UserError):
        e = as_api_error(e)
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errors = e.errors()
        message, param = _describe(errors[0]) if errors else ("invalid request", None)
        locs = [[str(x) for x in err.get("loc", ()) if x != "body"] for err in errors]
        if len(errors) > 1 and errors[0].get("type") != "json_invalid":
            # A union (prompt: str | list[int] | ...) fails once per member, with the member's name
            # in the location: report the field they share, and what each member wanted.
            common = locs[0]
            for loc in locs[1:]:
                n = next((i for i, (a, b) in enumerate(zip(common, loc)) if a != b), min(len(common), len(loc)))
                common = common[:n]
            if common:
                param = ".".join(common)
                wanted = list(dict.fromkeys(err.get("msg", "") for err in errors))[:3]
                message = f"{param}: wrong type or value ({'; or '.join(wanted)})"
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        status = e.status_code if 400 <= e.status_code < 500 else 500
        return error_response(status, message, None, {404: "not_found", 405: "method_not_allowed"}.get(status),
                              getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.error("unhandled error on %s %s:\n%s", request.method, request.url.path,
                  "".join(traceback.format_exception(e)))
        return error_response(500, "internal server error", None, "internal_error")
