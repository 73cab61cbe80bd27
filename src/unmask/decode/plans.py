"""The concrete decode plans (see plan.py for the interface) and `make_plan`, the one place that
maps a model's attention kind and the engine's cache option to a plan."""
from __future__ import annotations

from typing import TYPE_CHECKING


from ..errors import UserError
from .plan import Applied, DecodePlan, block_causal, causal, full
from .window import Window

if TYPE_CHECKING:
    from ..engine.request import Request


class BlockExactPlan(DecodePlan):
    """Block-causal models with the exact KV cache. A request's window is [cached, end of its
    current block): the first forward prefills the prompt and runs the first block, later forwards
    run the block only, and the first forward of each new block re-encodes the finished block with
    its final tokens (the fused append). After each forward, `cached` advances to the start of the
    current block: everything before it is clean and never changes. With a logit shift the window
    also feeds the position before the block, whose output scores the block's first token."""

    name = "exact"

    def __init__(self, block_size: int, logit_shift: int = 0):
        super().__init__(block_size, logit_shift)
        self.decode_window = 2 * block_size + logit_shift
        # A lookahead step's ordinary row writes its keys to one scratch page: the window must fit.
        self.lookahead = logit_shift == 0
        # None: look ahead from a block's last open position only; p: also from several, when the
        # previous forward was at least p sure of each (decode/lookahead.py)
        self.lookahead_gate: float | None = None

    @property
    def page_size(self) -> int:
        return self.block_size

    def attend(self, q, k):
        return block_causal(self.block_size, q, k)

    def window(self, r: Request) -> Window:
        b, e = r.block
        start = min(r.cached, b - self.logit_shift)
        # Only whole blocks before the block being decoded are clean: the prompt's tail in that
        # block sees its masks (attention is bidirectional inside a block).
        return self.chunk(start, b // self.block_size * self.block_size - self.logit_shift) or Window(start, e, e, b, e)

    def key_end(self, r: Request) -> int:
        from .lookahead import key_end
        return key_end(r, self.window(r), self.lookahead_gate)

    def extra_row(self, r: Request):
        from .lookahead import lookahead_row
        return lookahead_row(r, self.lookahead_gate)

    def after_forward(self, r: Request, w: Window) -> None:
        r.nfe += 1
        if w.lo == w.hi:  # a prefill chunk
            r.cached = w.end
            return
        b, _ = r.block
        r.cached = max(r.cached, b // self.block_size * self.block_size)

    def apply(self, r: Request, w: Window, commit, tokens, extra=None) -> Applied:
        from .lookahead import take_lookahead
        done = super().apply(r, w, commit, tokens)
        if extra is None or done.done is not None:
            return done
        return take_lookahead(r, done, extra)


class CausalPlan(DecodePlan):
    """Autoregressive models: one query token per step (the last committed one; its output scores
    the next position), on the exact cache, or re-encoding the prefix every step without it."""

    single_open = True
    decode_window = 1

    def __init__(self, block_size: int, uses_cache: bool = True):
        super().__init__(block_size, logit_shift=1)
        self.uses_cache = uses_cache
        self.name = "exact" if uses_cache else "none"
        if not uses_cache:
            self.decode_window = 0

    def attend(self, q, k):
        return causal(q, k)

    def window(self, r: Request) -> Window:
        if not self.uses_cache:
            return Window(0, r.cur, r.cur, r.cur, r.cur + 1)
        return self.chunk(r.cached, r.cur - 1) or Window(r.cached, r.cur, r.cur, r.cur, r.cur + 1)

    def after_forward(self, r: Request, w: Window) -> None:
        r.nfe += 1
        if self.uses_cache:
            r.cached = w.end

    def apply(self, r: Request, w: Window, commit, tokens, extra=None) -> Applied:
        if w.lo == w.hi:  # a prefill chunk: nothing scored
            return Applied([], None)
        r.canvas[r.cur] = tokens[0]
        committed = [r.cur - r.lo]
        r.cur += 1
        done = "stop" if int(tokens[0]) in r.stop_ids else ("length" if r.cur >= r.hi else None)
        return Applied(committed, done)


class FullApproxPlan(DecodePlan):
    """Full-attention models on Fast-dLLM's approximate cache: a refresh forward covers the whole
    canvas at every block start (and every `refresh_interval` steps); in between, the dual cache
    forwards only the block (the suffix keys are stale), the prefix cache block + suffix."""

    def __init__(self, block_size: int, mode: str, refresh_interval: int | None = None, logit_shift: int = 0):
        super().__init__(block_size, logit_shift)
        self.name, self.refresh_interval = mode, refresh_interval

    def attend(self, q, k):
        return full(q, k)

    def needs_refresh(self, r: Request) -> bool:
        return r.step_in_block == 0 or (self.refresh_interval is not None and r.since_refresh >= self.refresh_interval)

    def window(self, r: Request) -> Window:
        L = r.length
        b, e = r.block
        if self.needs_refresh(r):
            return Window(0, L, L, b, e)
        start = b - self.logit_shift
        return Window(start, e, L, b, e) if self.name == "dual" else Window(start, L, L, b, e)

    def after_forward(self, r: Request, w: Window) -> None:
        r.nfe += 1
        refreshed = w.start == 0 and w.end == r.length  # a full forward: every key is fresh
        r.since_refresh = 1 if refreshed else r.since_refresh + 1  # forwards since that refresh


class NoCachePlan(DecodePlan):
    """No cache (block-causal or full attention): every forward feeds the whole canvas from
    position 0 under the model's own pattern; the slow, exact path."""

    name = "none"
    uses_cache = False

    def __init__(self, block_size: int, pattern, logit_shift: int = 0):
        super().__init__(block_size, logit_shift)
        self._pattern = pattern

    def attend(self, q, k):
        return self._pattern(q, k)

    def window(self, r: Request) -> Window:
        b, e = r.block
        return Window(0, r.length, r.length, b, e)


def model_logit_shift(cfg) -> int:
    """Where a model's logits come from: an autoregressive model's output at p scores p + 1 by
    definition; a diffusion family says so in its config (`logit_shift`, Dream and Fast-dLLM v2)."""
    return 1 if cfg.attention == "causal" else int(getattr(cfg, "logit_shift", 0))


# attention kind -> {cache option -> plan factory}; the first option is what "auto" picks.
PLANS = {
    "block": {
        "exact": lambda cfg, ri: BlockExactPlan(cfg.block_size, model_logit_shift(cfg)),
        "none": lambda cfg, ri: NoCachePlan(cfg.block_size, lambda q, k: block_causal(cfg.block_size, q, k),
                                            model_logit_shift(cfg)),
    },
    "causal": {
        "exact": lambda cfg, ri: CausalPlan(cfg.block_size),
        "none": lambda cfg, ri: CausalPlan(cfg.block_size, uses_cache=False),
    },
    "full": {
        "dual": lambda cfg, ri: FullApproxPlan(cfg.block_size, "dual", ri, model_logit_shift(cfg)),
        "prefix": lambda cfg, ri: FullApproxPlan(cfg.block_size, "prefix", ri, model_logit_shift(cfg)),
        "none": lambda cfg, ri: NoCachePlan(cfg.block_size, full, model_logit_shift(cfg)),
    },
}


def cache_options(cfg) -> tuple[str, ...]:
    return tuple(PLANS[cfg.attention])


def make_plan(cfg, cache: str = "auto", refresh_interval: int | None = None,
              prefill_chunk: int | None = None) -> DecodePlan:
    """The plan for a model config and the engine's `cache` option ("auto" = the first listed).
    prefill_chunk: prefill long prompts in chunks of about this many tokens (exact-cache plans; a
    block plan rounds it down to whole blocks)."""
    options = PLANS[cfg.attention]
    name = next(iter(options)) if cache == "auto" else cache
    if name not in options:
        raise UserError(f"cache {cache!r} does not apply to {cfg.attention} attention; choose one of: "
                        f"auto, {', '.join(options)}")
    plan = options[name](cfg, refresh_interval)
    if prefill_chunk is not None:
        if prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be >= 1 (or None: one forward), got {prefill_chunk}")
        if isinstance(plan, BlockExactPlan):
            plan.prefill_chunk = max(1, prefill_chunk // cfg.block_size) * cfg.block_size
        elif isinstance(plan, CausalPlan) and plan.uses_cache:
            plan.prefill_chunk = prefill_chunk
    return plan


__all__ = ["BlockExactPlan", "CausalPlan", "FullApproxPlan", "NoCachePlan", "make_plan", "cache_options",
           "model_logit_shift"]
