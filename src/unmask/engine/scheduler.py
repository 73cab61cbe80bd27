"""The scheduler: admits and retires requests and owns the KV budget.

Admission is first come, first served while a batch slot and enough cache pages for the request's
next window are free. When a running request cannot grow, the most recently admitted one is
preempted: its pages are freed and it goes back to the front of the queue to start over (at
temperature 0, or with a seed, it produces the same output when it runs again). A step that would
mix prefill windows with decode windows runs the prefills alone.
"""
from __future__ import annotations

from collections import deque

from ..decode import DecodePlan
from .kv_cache import PagedKVCache
from .request import Request


class Scheduler:
    def __init__(self, max_batch: int, cache: PagedKVCache | None, plan: DecodePlan, on_release=None):
        self.max_batch, self.cache, self.plan = max_batch, cache, plan
        # Called with a request whose cache is given up (retired or preempted): a runner that keeps
        # per-request state of its own (llama.cpp's sequences) forgets it.
        self.on_release = on_release
        # The longest window that counts as decoding (0: never separate prefills).
        self.decode_window = plan.decode_window if cache is not None else 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def _need(self, req: Request) -> int:
        return self.plan.key_end(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.cache.release(req.pages)
        if self.on_release is not None:
            self.on_release(req)
        req.reset()
        req.set_mask_id(req.mask_id)
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> list[Request]:
        """The requests that take part in the next forward, with cache pages for their windows."""
        if self.cache is not None:
            for req in list(self.running):
                if req not in self.running:
                    continue
                while not self.cache.grow(req.pages, self._need(req)):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is req:
                        break
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            if self.cache is not None:
                # Keep one free page per running request as headroom, so admitting a newcomer does not
                # immediately force a preemption when the others grow (admission thrash).
                need = self.cache.pages_for(self._need(req)) - len(req.pages)
                if self.running and need + len(self.running) > self.cache.free_pages:
                    break
                if not self.cache.grow(req.pages, self._need(req)):
                    break
            self.running.append(self.waiting.popleft())
        batch = list(self.running)
        if self.decode_window:
            # The runner pads every window to the longest, so one prompt being prefilled would make
            # all the decoding rows pay for its length. Prefills therefore get steps of their own
            # (first, as newcomers should start); the decoding requests wait one step and are
            # otherwise unaffected: a request's own computation does not depend on its batch.
            long = [r for r in batch if self._window(r) > self.decode_window]
            if long and len(long) < len(batch):
                batch = long
        return batch

    def _window(self, req: Request) -> int:
        w = self.plan.window(req)
        return w.end - w.start

    def retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.cache is not None:
            self.cache.release(req.pages)
        if self.on_release is not None:
            self.on_release(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
