"""One request's decoding state: its canvas, where its blocks are, and what the next forward must
cover. The runner turns `plan()` into a slice of the ragged batch; the engine applies commits."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..sampling.noise import make_generator
from ..sampling.schedule import block_spans, num_transfer_tokens, steps_per_block
from .healing import unheal
from .params import Resolved


@dataclass
class Window:
    """What one request contributes to a forward.

    Query positions [start, end) are fed (their tokens are canvas[start:end]); keys are positions
    [0, key_end): those below `start` come from the cache. Logits are wanted at [lo, hi).
    """

    start: int
    end: int
    key_end: int
    lo: int
    hi: int


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    nfe: int
    tokens_per_forward: float
    seconds: float
    ttft: float | None
    preemptions: int = 0
    error: str | None = None


@dataclass
class Request:
    id: str
    head: list[int]
    tail: list[int]
    s: Resolved
    seed: int | None
    stream_canvas: bool = False
    refresh_interval: int | None = None  # full-attention approximate cache: steps between refreshes
    stop_ids: frozenset[int] = frozenset()  # EOS, plus end-of-turn for chats
    heal: str = ""  # prompt healing: the whitespace taken off the prompt, which the model rewrites
    heal_mask: torch.Tensor | None = None  # (vocab,) bool: the tokens allowed first (set iff heal)
    lookahead: bool = False  # may this request's steps carry a lookahead row (engine/lookahead.py)
    arrival: float = field(default_factory=time.perf_counter)
    # runtime state, reset on preemption
    pages: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    nfe: int = 0
    preemptions: int = 0
    emitted: int = 0  # characters of committed text already streamed

    def __post_init__(self):
        self.lo = len(self.head)
        self.hi = self.lo + self.s.max_tokens
        self.reset()

    @property
    def length(self) -> int:
        return self.hi + len(self.tail)

    def reset(self) -> None:
        """Back to an untouched canvas (used at creation and when preempted)."""
        self.canvas = torch.tensor(self.head + [-1] * self.s.max_tokens + self.tail, dtype=torch.long)
        self.generator = make_generator(self.seed, "cpu") if self.s.temperature > 0 else None
        self.cached = 0  # positions [0, cached) hold final keys/values in the cache
        self.cur = self.lo  # causal models: the next position to fill
        self.draft: torch.Tensor | None = None  # the last forward's proposals for the current block
        self.spans = block_spans(self.lo, self.hi, self.s.block_size)
        self.span_idx = 0
        self.block_steps = steps_per_block([e - b for b, e in self.spans], self.s.steps)
        self._start_block()

    def set_mask_id(self, mask_id: int) -> None:
        self.canvas[self.canvas == -1] = mask_id
        self.mask_id = mask_id

    def _start_block(self) -> None:
        if self.span_idx < len(self.spans):
            b, e = self.spans[self.span_idx]
            self.schedule = num_transfer_tokens(e - b, self.block_steps[self.span_idx])
        self.step_in_block = 0
        self.since_refresh = 0
        self.draft = None

    @property
    def block(self) -> tuple[int, int]:
        return self.spans[self.span_idx]

    def plan(self, attention: str, cache: str) -> Window:
        """The window of the next forward, given the model's attention and the engine's cache mode."""
        L = self.length
        if attention == "causal":
            start = self.cached if cache != "none" else 0
            return Window(start, self.cur, self.cur, self.cur - 1, self.cur)
        b, e = self.block
        if cache == "none":
            return Window(0, L, L, b, e)
        if attention == "block":
            return Window(self.cached, e, e, b, e)
        # full attention, approximate cache: refresh (full canvas) at block start and every interval
        if self.needs_refresh:
            return Window(0, L, L, b, e)
        if cache == "dual":
            return Window(b, e, L, b, e)
        return Window(b, L, L, b, e)  # prefix cache

    @property
    def needs_refresh(self) -> bool:
        return self.step_in_block == 0 or (self.refresh_interval is not None and self.since_refresh >= self.refresh_interval)

    def topk_k(self) -> int:
        return self.schedule[self.step_in_block] if self.step_in_block < len(self.schedule) else 1

    def next_topk_k(self) -> int:
        """topk_k of the next block's first step."""
        b, e = self.spans[self.span_idx + 1]
        return num_transfer_tokens(e - b, self.block_steps[self.span_idx + 1])[0]

    def after_forward(self, attention: str, cache: str, window: Window) -> None:
        self.nfe += 1
        if cache == "none":
            return
        if attention == "causal":
            self.cached = window.end
        elif attention == "block":
            b, _ = self.block
            self.cached = max(self.cached, b // self.s.block_size * self.s.block_size)
        else:
            refreshed = window.start == 0 and window.end == self.length  # a full forward: every key is fresh
            self.since_refresh = 1 if refreshed else self.since_refresh + 1  # forwards since that refresh

    def heal_at(self, attention: str, window: Window) -> int | None:
        """The index, among this forward's logit positions, of the first generated position while
        it is still open and the healing constraint applies to it; else None."""
        if self.heal_mask is None:
            return None
        if attention == "causal":  # the one logit position predicts canvas[cur]
            return 0 if self.cur == self.lo else None
        if window.lo <= self.lo < window.hi and int(self.canvas[self.lo]) == self.mask_id:
            return self.lo - window.lo
        return None

    def text_of(self, model_text: str) -> str:
        """Generated text, relative to the prompt the user gave (see healing.unheal)."""
        return unheal(model_text, self.heal)

    def block_done(self) -> bool:
        b, e = self.block
        return not bool((self.canvas[b:e] == self.mask_id).any())

    def generated(self) -> list[int]:
        return self.canvas[self.lo:self.hi].tolist()

    def committed_prefix(self) -> tuple[list[int], bool]:
        """The generated tokens up to the first still-masked position, cut at the first stop token;
        and whether a stop token was seen."""
        gen = self.canvas[self.lo:self.hi]
        masked = (gen == self.mask_id).nonzero()
        n = int(masked[0]) if len(masked) else len(gen)
        ids = gen[:n].tolist()
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                return ids[:i], True
        return ids, False
