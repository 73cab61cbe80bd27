"""One request's decoding state: its canvas, where its blocks are, how far its cache is valid.
What the next forward covers, and how a step changes this state, is the decode plan's business
(`unmask.decode`); this class holds no mode of its own."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..sampling.noise import make_generator
from ..sampling.schedule import block_spans, num_transfer_tokens, steps_per_block
from ..decode.window import Window  # noqa: F401  (re-exported: tests and the runner name it here)
from ..frontend.healing import unheal
from ..frontend.params import Resolved


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
    holes: list | None = None  # a template's holes as filled, in order (frontend.template.FilledHole)


@dataclass
class Request:
    id: str
    head: list[int]
    tail: list[int]
    s: Resolved
    seed: int | None
    stream_canvas: bool = False
    stop_ids: frozenset[int] = frozenset()  # EOS, plus end-of-turn for chats
    heal: str = ""  # prompt healing: the whitespace taken off the prompt, which the model rewrites
    heal_mask: torch.Tensor | None = None  # (vocab,) bool: the tokens allowed first (set iff heal)
    lookahead: bool = False  # may this request's steps carry a lookahead row (engine/lookahead.py)
    constraint: object | None = None  # structured.state.GrammarState: the output's grammar (structured/stage.py)
    # A template in one canvas (frontend/template.py): the generated region's initial content (fixed
    # ids, -1 at hole positions; its length is max_tokens) and the holes' absolute spans. A stop token
    # ends its hole, not the request; the request is done when no position is masked.
    region: list[int] | None = None
    holes: list[tuple[int, int]] | None = None
    hole_constraints: list | None = None  # per hole, a GrammarState or None (structured/layout.py)
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
        region = self.region if self.region is not None else [-1] * self.s.max_tokens
        self.canvas = torch.tensor(self.head + region + self.tail, dtype=torch.long)
        self.generator = make_generator(self.seed, "cpu") if self.s.temperature > 0 else None
        self.cached = 0  # positions [0, cached) hold final keys/values in the cache
        self.cur = self.lo  # causal models: the next position to fill
        self.since_refresh = 0  # approximate caches: forwards since the last full refresh
        self.draft: torch.Tensor | None = None  # the last forward's proposals for the current block
        self.draft_conf: torch.Tensor | None = None  # and their confidences
        for g in [self.constraint, *(self.hole_constraints or ())]:
            if g is not None:
                g.reset()
        if self.s.remask > 0:  # self-correction (decode/remask.py): per position, for the generated region
            self.generated_mask = self.canvas == -1
            self.confidence = torch.full((len(self.canvas),), float("inf"))
            self.revisions = torch.zeros(len(self.canvas), dtype=torch.int32)
        self.revised = 0  # positions sent back to mask so far
        # Blocks with a position to decode (a template's fixed spans may fill whole blocks), and the
        # masks in each: the steps are shared out by those.
        open_ = self.canvas == -1
        self.spans = [(b, e) for b, e in block_spans(self.lo, self.hi, self.s.block_size) if bool(open_[b:e].any())]
        self._open = [int(open_[b:e].sum()) for b, e in self.spans]
        self.span_idx = 0
        self.block_steps = steps_per_block(self._open, self.s.steps)
        self.start_block()

    def set_mask_id(self, mask_id: int) -> None:
        self.canvas[self.canvas == -1] = mask_id
        self.mask_id = mask_id

    def start_block(self) -> None:
        if self.span_idx < len(self.spans):
            self.schedule = num_transfer_tokens(self._open[self.span_idx], self.block_steps[self.span_idx])
        self.step_in_block = 0
        self.since_refresh = 0
        self.draft = self.draft_conf = None

    @property
    def block(self) -> tuple[int, int]:
        return self.spans[self.span_idx]

    def topk_k(self) -> int:
        return self.schedule[self.step_in_block] if self.step_in_block < len(self.schedule) else 1

    def next_topk_k(self) -> int:
        """topk_k of the next block's first step."""
        return num_transfer_tokens(self._open[self.span_idx + 1], self.block_steps[self.span_idx + 1])[0]

    def heal_at(self, window: Window) -> int | None:
        """The index, among this forward's scored positions, of the first generated position while
        it is still open and the healing constraint applies to it; else None."""
        if self.heal_mask is None:
            return None
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
        if self.s.remask > 0 and self.finish_reason is None and self.span_idx < len(self.spans):
            n = min(n, self.block[0] - self.lo)  # the current block may still be revised
        ids = gen[:n].tolist()
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                return ids[:i], True
        return ids, False
