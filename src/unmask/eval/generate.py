"""One way to generate for every evaluation and for the benchmark: a `Decoding` (which sampler, which
policy and setting) applied to a list of `Task`s at a given concurrency, timed.

- sampler "engine": one `unmask.Engine`; a closed-loop client keeps `concurrency` requests in flight
  (a new one is submitted as soon as one finishes) and steps the engine until all are done.
- sampler "reference": `reference_generate`, one request at a time (it cannot batch); any
  concurrency runs sequentially and the batch says so (`sequential=True`). It knows no stop
  strings, so it always generates max_tokens (or up to EOS); callers truncate afterwards.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Imported up front, not per call: a long benchmark must not pick up a half-edited module midway.
from ..engine import Engine, SamplingParams
from ..frontend.healing import split_trailing_whitespace  # noqa: F401 (part of this module's surface)
from ..sampling import layout_prompt, reference_generate


@dataclass(frozen=True)
class Decoding:
    name: str
    sampler: str = "engine"  # "engine" or "reference"
    policy: str | None = None  # None: the model's generation_config
    threshold: float | None = None  # tau / factor / gamma, per policy
    steps_ratio: float | None = None  # topk: steps = max_tokens * steps_ratio (1.0 = one token per forward)
    quantize: str | None = None  # engine weight quantization: None, "int8" or "bf16"
    fallback: str | None = None  # engine policies other than topk: "best" or "leftmost"; None: the model's
    lookahead: bool = True  # the engine's block lookahead (engine/lookahead.py); the tokens do not change
    backend: str = "torch"  # the engine's forward: "torch" or "llama.cpp"
    remask: float | None = None  # self-correction threshold (decode/remask.py); None: off

    def steps(self, max_tokens: int) -> int | None:
        return None if self.steps_ratio is None else max(1, round(max_tokens * self.steps_ratio))

    def describe(self) -> str:
        s = f"{self.sampler}, {self.policy or 'default policy'}"
        if self.steps_ratio is not None:
            s += f", steps=length*{self.steps_ratio:g}"
        if self.threshold is not None:
            s += f", {self.threshold:g}"
        if self.fallback is not None:
            s += f", {self.fallback} fallback"
        if self.quantize is not None:
            s += f", {self.quantize} weights"
        if not self.lookahead:
            s += ", no lookahead"
        if self.backend != "torch":
            s += f", {self.backend} backend"
        if self.remask:
            s += f", remask {self.remask:g}"
        return s


@dataclass
class Task:
    prompt: str
    suffix: str | None = None  # fill-in-the-middle


@dataclass
class Completion:
    text: str
    completion_tokens: int
    nfe: int
    latency: float  # seconds from submission to the last token
    ttft: float | None  # seconds from submission to the first committed token
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Batch:
    completions: list[Completion]
    wall_seconds: float
    concurrency: int
    sequential: bool = False  # True: the sampler ran the requests one after another
    extra: dict = field(default_factory=dict)


def _unheal(text: str, ws: str, stop: Sequence[str] | None) -> str:
    """A completion of the stripped prompt, as a completion of the original one, cut at stops."""
    if text.startswith(ws):
        text = text[len(ws):]
    for s in stop or ():
        if s in text:
            text = text[: text.index(s)]
    return text


def run_tasks(model, tasks: Sequence[Task], decoding: Decoding, *, max_tokens: int, concurrency: int = 1,
              stop: Sequence[str] | None = None, max_batch: int = 16, progress=None, heal: bool = True) -> Batch:
    """Generate one greedy completion per task; outputs in task order.

    heal: a prompt that ends in a newline (plus indentation) is sent without that whitespace, and
    the model writes it (`split_trailing_whitespace`; frontend/healing.py says why). It is done here,
    and the engine is told heal=False, so that the reference sampler is healed the same way and the
    numbers stay those of unconstrained decoding. Completions are returned relative to the
    original prompt. Such tasks get their stop strings applied afterwards, since the first thing
    they generate is a newline; they therefore run to max_tokens (or EOS).
    `extra["cpu_seconds"]`: CPU time this process used meanwhile (all threads); well below
    wall * threads means the run shared the CPU with something else.
    """
    if decoding.sampler not in ("engine", "reference"):
        raise ValueError(f"unknown sampler {decoding.sampler!r}")
    splits = [split_trailing_whitespace(t.prompt) if heal else (t.prompt, "") for t in tasks]
    sent = [Task(p, t.suffix) for (p, _), t in zip(splits, tasks)]
    cpu0 = time.process_time()
    if decoding.sampler == "reference":
        batch = _run_reference(model, sent, decoding, max_tokens, concurrency, progress)
    else:
        stops = [None if ws else stop for _, ws in splits]
        batch = _run_engine(model, sent, decoding, max_tokens, concurrency, stops, max_batch, progress)
    for c, (_, ws) in zip(batch.completions, splits):
        if ws:
            c.text = _unheal(c.text, ws, stop)
    batch.extra["cpu_seconds"] = time.process_time() - cpu0
    return batch


def warm_up(model, decoding: Decoding, prompt: str = "def f(x):\n    return") -> None:
    """One short untimed generation: first-call allocations and lazy initialisation stay out of timings."""
    run_tasks(model, [Task(prompt)], decoding, max_tokens=4, concurrency=1)


def _sampling_params(decoding: Decoding, task: Task, max_tokens: int, stop):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, policy=decoding.policy,
                          threshold=decoding.threshold, fallback=decoding.fallback, steps=decoding.steps(max_tokens),
                          stop=list(stop) if stop else None, suffix=task.suffix, heal=False, remask=decoding.remask)


def _run_engine(model, tasks, decoding, max_tokens, concurrency, stops, max_batch, progress) -> Batch:
    """stops: per task."""
    engine = Engine(model, max_batch=max(max_batch, concurrency), quantize=decoding.quantize,
                    lookahead=decoding.lookahead, backend=decoding.backend)
    params = [_sampling_params(decoding, t, max_tokens, st) for t, st in zip(tasks, stops)]
    pending = deque(range(len(tasks)))
    inflight: dict[str, int] = {}
    outs: dict[int, object] = {}
    t0 = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            i = pending.popleft()
            inflight[engine.add_request(tasks[i].prompt, params[i], request_id=f"task-{i}")] = i
        for ev in engine.step():
            if ev.finished and ev.request_id in inflight:
                outs[inflight.pop(ev.request_id)] = ev.output
                if progress is not None:
                    progress(1)
    wall = time.perf_counter() - t0
    comps = [Completion(o.text, o.completion_tokens, o.nfe, o.seconds, o.ttft, o.finish_reason, o.error)
             for o in (outs[i] for i in range(len(tasks)))]
    return Batch(comps, wall, concurrency, extra={"engine_steps": engine.steps})


class _FirstTokenClock:
    """Times when the reference sampler's first completion token is committed: the first forward
    whose input canvas already holds a non-mask token at the first generated position."""

    def __init__(self, net, lo: int, mask_id: int):
        self.lo, self.mask_id, self.at = lo, mask_id, None
        self.handle = net.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.at is None:
            idx = args[0] if args else kwargs["idx"]
            if idx.shape[1] > self.lo and int(idx[0, self.lo]) != self.mask_id:
                self.at = time.perf_counter()

    def close(self) -> None:
        self.handle.remove()


def _run_reference(model, tasks, decoding, max_tokens, concurrency, progress) -> Batch:
    comps = []
    t_all = time.perf_counter()
    for task in tasks:
        head, _ = layout_prompt(model, task.prompt, task.suffix)
        clock = _FirstTokenClock(model.net, len(head), model.config.mask_token_id)
        t0 = time.perf_counter()
        try:
            out = reference_generate(model, task.prompt, max_tokens=max_tokens, steps=decoding.steps(max_tokens),
                                     temperature=0.0, policy=decoding.policy or "topk", suffix=task.suffix)
        finally:
            clock.close()
        t1 = time.perf_counter()
        ttft = (clock.at if clock.at is not None else t1) - t0 if out.completion_tokens else None
        comps.append(Completion(out.text, out.completion_tokens, out.nfe, t1 - t0, ttft, out.finish_reason))
        if progress is not None:
            progress(1)
    return Batch(comps, time.perf_counter() - t_all, concurrency, sequential=True)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (None: leave as is); returns the number in force."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
