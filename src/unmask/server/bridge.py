"""The engine loop, in its own thread, and its bridge to asyncio.

The Engine is not thread-safe, so exactly one thread (started here) ever touches it. Handlers talk
to it through one thread-safe command queue; the engine thread answers each request through that
request's own asyncio.Queue, via `loop.call_soon_threadsafe`, so the event loop never blocks on a
forward pass. The first item a request's queue receives is the verdict on `add_request` (Accepted
or the UserError), so a bad request is answered 400 before any response has started.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from ..errors import UserError

log = logging.getLogger("unmask.server")


class Accepted:
    """The engine queued the request."""


class ShuttingDown(Exception):
    pass


class EngineFailure(Exception):
    """A bug in the engine: the request cannot complete. Not the client's fault."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    # which events cross to the event loop: "final", "delta" (non-empty text) or "all" (every
    # step, for the canvas). Every crossing wakes the loop and takes the GIL from the engine.
    want: str = "all"


class EngineBridge:
    def __init__(self, engine, metrics=None):
        self.engine, self.metrics = engine, metrics
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.aborted = 0  # requests cancelled before they finished (disconnects, timeouts)

    # ---- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unmask-engine", daemon=True)
        self._thread.start()

    async def submit(self, rid: str, prompt, params, want: str = "all") -> asyncio.Queue:
        """Queue a request; returns the queue its engine Events arrive on. Raises UserError."""
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        q: asyncio.Queue = asyncio.Queue()
        self._cmds.put(("add", rid, prompt, params, _Sink(asyncio.get_running_loop(), q, want)))
        try:
            verdict = await q.get()
        except BaseException:
            self.abort(rid)
            raise
        if isinstance(verdict, BaseException):
            raise verdict
        return q

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid))

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new requests, let running ones finish, then end the thread. True if it ended."""
        self._stopping = True
        self._cmds.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    self._drain(block=not self.engine.has_work())
                    if self._stopping and not self.engine.has_work():
                        break
                    if self.engine.has_work():
                        self._step()
                    self._gauges()
                except Exception:  # this thread must outlive any bug, or every later request hangs
                    log.error("engine loop failed; failing the running requests:\n%s", traceback.format_exc())
                    self._fail_all()
                    time.sleep(0.05)  # if the engine stays broken, fail requests without spinning
        for rid in list(self._sinks):  # only reachable if something was left behind
            self._send(rid, ShuttingDown("the server shut down"), last=True)

    def _fail_all(self) -> None:
        for rid in list(self._sinks):
            try:
                self.engine.abort(rid)
            except Exception:
                log.error("abort(%s) failed:\n%s", rid, traceback.format_exc())
            self._send(rid, EngineFailure("the engine failed while running this request"), last=True)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, sink = cmd
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except UserError as e:
                self._post(sink, e)
                return
            except Exception:  # a bug: say so, keep serving everyone else
                log.error("add_request failed:\n%s", traceback.format_exc())
                self._post(sink, EngineFailure("the engine could not accept the request"))
                return
            self._sinks[rid] = sink
            self._post(sink, Accepted())
        elif kind == "abort":
            rid = cmd[1]
            if self._sinks.pop(rid, None) is not None:
                # Counted first: another thread that sees the engine idle must also see the count.
                self.aborted += 1
                if self.metrics:
                    self.metrics.requests.labels("aborted").inc()
                self.engine.abort(rid)
        elif kind == "stop":
            self._stopping = True

    def _step(self) -> None:
        rows, hits = self.engine.lookahead_rows, self.engine.lookahead_hits
        events = self.engine.step()  # if it raises, _run fails the running requests
        if self.metrics:
            self.metrics.steps.inc()
            self.metrics.lookahead_rows.inc(self.engine.lookahead_rows - rows)
            self.metrics.lookahead_hits.inc(self.engine.lookahead_hits - hits)
        for ev in events:
            if ev.finished:
                if self.metrics and ev.output is not None:
                    self.metrics.finished(ev.output)
                self._send(ev.request_id, ev, last=True)
            else:
                sink = self._sinks.get(ev.request_id)
                if sink is not None and (sink.want == "all" or (sink.want == "delta" and ev.delta)):
                    self._send(ev.request_id, ev)

    def _send(self, rid: str, item, last: bool = False) -> None:
        sink = self._sinks.pop(rid, None) if last else self._sinks.get(rid)
        if sink is not None and not self._post(sink, item):
            self._sinks.pop(rid, None)
            self.engine.abort(rid)

    @staticmethod
    def _post(sink: _Sink, item) -> bool:
        try:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is gone; nobody is listening
            return False

    def _gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.waiting.set(self.engine.num_waiting)
        m.running.set(self.engine.num_running)
        if self.engine.cache is not None:
            m.free_pages.set(self.engine.cache.free_pages)
