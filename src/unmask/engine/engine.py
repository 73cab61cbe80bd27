"""`unmask.Engine`: continuous batching for diffusion and AR models, text in and text out.

    Engine (this file) = frontend (unmask.frontend: prompts, chat templates, healing, parameters,
                                   detokenising, stop strings, UTF-8 hold-back)
                       + core     (engine/core.py: token ids in, token events out; scheduler, KV
                                   cache, runner, policies, the model's decode plan)

`add_request` turns a prompt into a core request (bad input raises UserError before anything is
queued); `step()` runs one core step and turns its token events into text `Event`s; `generate` and
`stream` are loops over `step()`.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import UserError
from ..frontend.output import TextStream
from ..frontend.params import SamplingParams
from ..frontend.processor import InputProcessor
from .core import EngineCore, TokenEvent
from .request import Request, RequestOutput


@dataclass
class Event:
    """What one step did for one request: newly committed text, optionally the whole canvas."""

    request_id: str
    delta: str
    finished: bool
    output: RequestOutput | None = None
    canvas: list[int] | None = None  # generated region; mask_id marks still-masked positions
    committed: list[int] | None = None  # positions (relative to the generated region) committed this step


# What the Engine shows of its core (tests, the server's metrics and the bench read these).
_CORE = frozenset({"model", "net", "plan", "cache", "cache_mode", "runner", "scheduler", "lookahead", "max_batch",
                   "max_rows", "lookahead_rows", "lookahead_hits", "steps", "mask_id", "eos_id", "num_running",
                   "num_waiting", "has_work", "_requests", "backend"})


class Engine:
    def __init__(self, model, *, max_batch: int = 16, kv_budget_tokens: int | None = None, cache: str = "auto",
                 refresh_interval: int | None = None, quantize: str | None = None, compile: bool = False,
                 cuda_graphs: bool = False, lookahead: bool = True, prefill_chunk: int | None = 2048,
                 backend: str = "torch", lookahead_gate: float | None = None):
        """prefill_chunk: a prompt longer than this is prefilled into the KV cache in chunks of about
        this many tokens (block- and causal-attention models) instead of one quadratic attention.
        backend: "torch", or "llama.cpp" (CPU; block-causal and causal models; needs the
        llama-cpp-python package): the forward runs on llama.cpp's library with weights in `quantize`
        = None (f32), "f16" or "q8_0" (engine/llamacpp).
        lookahead_gate: None looks ahead from a block's last open position only; p in [0, 1] also from
        several open positions when the previous forward was at least p sure of each draft
        (decode/lookahead.py; the tokens are the same, only the forwards change)."""
        self.core = EngineCore(model, max_batch=max_batch, kv_budget_tokens=kv_budget_tokens, cache=cache,
                               refresh_interval=refresh_interval, quantize=quantize, compile=compile,
                               cuda_graphs=cuda_graphs, lookahead=lookahead, prefill_chunk=prefill_chunk,
                               backend=backend, lookahead_gate=lookahead_gate)
        self.processor = InputProcessor(self.core.model, needs_prompt=self.core.plan.needs_prompt,
                                        lookahead=self.core.lookahead)
        self._streams: dict[str, TextStream] = {}
        self._ids = itertools.count()

    def __getattr__(self, name):
        if name in _CORE:
            return getattr(self.__dict__["core"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue one request; raises UserError (and changes nothing) if it is bad."""
        rid = request_id or f"req-{next(self._ids)}"
        req, stream = self.processor.process(prompt, params, rid)
        self.core.add(req)
        self._streams[rid] = stream
        return rid

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._streams.pop(request_id, None)

    # ---- the step loop --------------------------------------------------------------------------
    def step(self) -> list[Event]:
        return [self._event(ev) for ev in self.core.step()]

    def _event(self, ev: TokenEvent) -> Event:
        r, stream = ev.request, self._streams[ev.request.id]
        if ev.done == "error":
            return self._finish(r, "error", None, [])
        ids, _ = r.committed_prefix()
        if ids and r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        text = stream.text(ids)
        cut = stream.stop_cut(text)
        done = "stop" if cut is not None else ev.done
        if done:
            return self._finish(r, done, cut, ev.committed)
        return Event(r.id, stream.delta(text), False, None, *self._canvas(r, ev.committed))

    def _canvas(self, r: Request, committed: list[int]):
        if not r.stream_canvas:
            return None, None
        return r.generated(), committed

    def _finish(self, r: Request, reason: str, cut: str | None, committed: list[int]) -> Event:
        self.core.finish(r, reason)
        stream = self._streams.pop(r.id)
        delta, text, ids = stream.finish(r.committed_prefix()[0], cut)
        return Event(r.id, delta, True, self._output(r, text, ids), *self._canvas(r, committed))

    @staticmethod
    def _output(r: Request, text: str, ids: list[int]) -> RequestOutput:
        seconds = (r.finished_at or time.perf_counter()) - r.arrival
        return RequestOutput(
            request_id=r.id, text=text, token_ids=ids, finish_reason=r.finish_reason,
            prompt_tokens=len(r.head) + len(r.tail), completion_tokens=len(ids), nfe=r.nfe,
            tokens_per_forward=len(ids) / max(r.nfe, 1), seconds=seconds,
            ttft=None if r.first_token_at is None else r.first_token_at - r.arrival,
            preemptions=r.preemptions, error=r.error,
        )

    # ---- convenience ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run all prompts to completion, batched; outputs in prompt order.

        Every request is validated before any runs, so a bad one raises UserError up front.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(plist)} sampling params")
        ids = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp))
        except UserError as e:
            for rid in ids:
                self.abort(rid)
            raise UserError(f"prompt {len(ids)}: {e}") from None
        want, outs = set(ids), {}
        while want - outs.keys():
            for ev in self.step():
                if ev.finished and ev.request_id in want:
                    outs[ev.request_id] = ev.output
        return [outs[i] for i in ids]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[Event]:
        """Yield this request's events step by step (other queued requests advance too)."""
        rid = self.add_request(prompt, params)
        while True:
            for ev in self.step():
                if ev.request_id == rid:
                    yield ev
                    if ev.finished:
                        return
