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
from ..frontend.template import FilledHole, TemplateJob
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
    holes: list[tuple[int, int]] | None = None  # a template's hole spans in `canvas` (the rest is its text)
    revised: list[int] | None = None  # positions of `canvas` sent back to mask this step (remask)


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
        self._templates: dict[str, TemplateJob] = {}  # template requests (frontend/template.py)
        self._ids = itertools.count()

    def __getattr__(self, name):
        if name in _CORE:
            return getattr(self.__dict__["core"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue one request; raises UserError (and changes nothing) if it is bad."""
        rid = request_id or f"req-{next(self._ids)}"
        req, stream, job = self.processor.process(prompt, params, rid)
        if job is not None:
            cache = self.core.cache
            if cache is not None and job.need > cache.capacity_tokens:  # a chain's later holes hold more
                raise UserError(f"template: its requests need up to {job.need} tokens of KV cache but the engine's "
                                f"budget is {cache.capacity_tokens}; raise kv_budget_tokens or lower the holes' budgets")
        self.core.add(req)
        if job is not None:
            self._templates[rid] = job
        self._streams[rid] = stream
        return rid

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._streams.pop(request_id, None)
        self._templates.pop(request_id, None)

    # ---- the step loop --------------------------------------------------------------------------
    def step(self) -> list[Event]:
        return [self._event(ev) for ev in self.core.step()]

    def _event(self, ev: TokenEvent) -> Event:
        r, stream = ev.request, self._streams[ev.request.id]
        if ev.done == "error":
            return self._finish(r, "error", None, [])
        job = self._templates.get(r.id)
        if job is not None:
            return self._template_event(ev, job, stream)
        ids, _ = r.committed_prefix()
        if ids and r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        text = stream.text(ids)
        cut = stream.stop_cut(text)
        done = "stop" if cut is not None else ev.done
        if done:
            return self._finish(r, done, cut, ev.committed)
        return Event(r.id, stream.delta(text), False, None, *self._canvas(r, ev.committed, ev.revised))

    def _canvas(self, r: Request, committed: list[int], revised: list[int] | None = None):
        """(canvas, committed, hole spans, revised) for a `diffusing` stream; Nones without one."""
        if not r.stream_canvas:
            return None, None, None, None
        job = self._templates.get(r.id)
        if job is not None:  # the whole template: fixed text, holes as filled, the running hole in place
            canvas, offset, spans = job.canvas(None if job.done() else r, self.core.mask_id)
            if job.mode == "chain" and job.done():  # the last hole just finished
                offset = spans[-1][0]
            return canvas, [offset + c for c in committed], spans, [offset + c for c in revised or []] or None
        return r.generated(), committed, None, revised or None

    def _template_event(self, ev: TokenEvent, job: TemplateJob, stream: TextStream) -> Event:
        """A step of a template request: in chain mode a finished hole starts the next one."""
        r, tok = ev.request, self.core.model.tokenizer
        if job.arrival is None:
            job.arrival = r.arrival
        if ev.done and job.mode == "chain":
            ids, _ = r.committed_prefix()
            job.record(ids, r.text_of(tok.decode(ids, skip_special=True)), ev.done)
            if not job.done():
                self.core.finish(r, ev.done)
                job.nfe, job.prompt_tokens = job.nfe + r.nfe, job.prompt_tokens + len(r.head) + len(r.tail)
                job.preemptions += r.preemptions
                try:
                    nxt = self.processor.template_request(job, r.id)
                    nxt.arrival, nxt.first_token_at = job.arrival, r.first_token_at
                    self.core.add(nxt)
                except Exception as e:  # a later hole that cannot run fails this request alone
                    r.error, r.finish_reason = f"{type(e).__name__}: {e}", "error"
                    self._streams.pop(r.id, None)
                    self._templates.pop(r.id, None)
                    return Event(r.id, "", True, self._output(r, "", [], job))
                return Event(r.id, stream.delta(job.visible(None, tok)), False, None, *self._canvas(nxt, []))
        if r.first_token_at is None and r.committed_prefix()[0]:
            r.first_token_at = time.perf_counter()
        if ev.done:
            return self._finish(r, ev.done, None, ev.committed)
        return Event(r.id, stream.delta(job.visible(r, tok)), False, None, *self._canvas(r, ev.committed, ev.revised))

    def _finish(self, r: Request, reason: str, cut: str | None, committed: list[int]) -> Event:
        canvas = self._canvas(r, committed)
        self.core.finish(r, reason)
        stream = self._streams.pop(r.id)
        job = self._templates.pop(r.id, None)
        if job is None:
            delta, text, ids = stream.finish(r.committed_prefix()[0], cut)
            return Event(r.id, delta, True, self._output(r, text, ids), *canvas)
        tok = self.core.model.tokenizer
        running = None if job.mode == "chain" else r
        ids, texts, finish = job.holes_of(running, tok)
        text = job.visible(running, tok)
        delta, stream.emitted = text[stream.emitted:], len(text)
        if reason != "error":  # "length" when a hole ran to its budget, as a completion cut at max_tokens
            r.finish_reason = "length" if "length" in finish else "stop"
        out = self._output(r, text, [t for h in ids for t in h], job)
        out.holes = [FilledHole(t, i, f) for t, i, f in zip(texts, ids, finish)]
        return Event(r.id, delta, True, out, *canvas)

    @staticmethod
    def _output(r: Request, text: str, ids: list[int], job: TemplateJob | None = None) -> RequestOutput:
        """ids: the generated tokens (a template's: its holes' tokens, not its text spans')."""
        arrival = job.arrival if job is not None and job.arrival is not None else r.arrival
        nfe = r.nfe + (job.nfe if job else 0)
        seconds = (r.finished_at or time.perf_counter()) - arrival
        return RequestOutput(
            request_id=r.id, text=text, token_ids=ids, finish_reason=r.finish_reason,
            prompt_tokens=len(r.head) + len(r.tail) + (job.prompt_tokens if job else 0), completion_tokens=len(ids),
            nfe=nfe, tokens_per_forward=len(ids) / max(nfe, 1), seconds=seconds,
            ttft=None if r.first_token_at is None else r.first_token_at - arrival,
            preemptions=r.preemptions + (job.preemptions if job else 0), error=r.error,
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
