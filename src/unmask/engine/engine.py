"""`unmask.Engine`: continuous batching for diffusion and AR models.

engine (this file) -> scheduler (admission, KV budget) -> runner (ragged batch, model call)
                   -> policies (what to commit; pure functions in unmask.sampling.policies)

Every `step()` runs one batched forward over all running requests; requests join and leave
between steps. Block-causal models use an exact KV cache (prefill once, then one block per step,
the finished block's keys fused into the next block's first step); causal models run on the same
path with one query token per step; full-attention models use Fast-dLLM's approximate prefix or
dual cache, refreshed at every block start and optionally every `refresh_interval` steps.
"""
from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..sampling.policies import ENTROPY, LEFTMOST, MARGIN, StepParams, propose_batch, select_commits
from ..sampling.prompt import is_chat, layout_prompt
from . import cpu_linear
from .cuda_graphs import GraphedForward, decode_limit
from .healing import ASCII_WHITESPACE, HealMasks, split_trailing_whitespace
from .kv_cache import PagedKVCache
from .lookahead import lookahead
from .params import SamplingParams, resolve
from .request import Request, RequestOutput
from .runner import ModelRunner
from .scheduler import Scheduler

CACHE_MODES = {"block": ("exact", "none"), "causal": ("exact", "none"), "full": ("dual", "prefix", "none")}


@dataclass
class Event:
    """What one step did for one request: newly committed text, optionally the whole canvas."""

    request_id: str
    delta: str
    finished: bool
    output: RequestOutput | None = None
    canvas: list[int] | None = None  # generated region; mask_id marks still-masked positions
    committed: list[int] | None = None  # positions (relative to the generated region) committed this step


class Engine:
    def __init__(self, model, *, max_batch: int = 16, kv_budget_tokens: int | None = None, cache: str = "auto",
                 refresh_interval: int | None = None, quantize: str | None = None, compile: bool = False,
                 cuda_graphs: bool = False, lookahead: bool = True):
        self.model = model
        cfg = model.config
        self.attention = cfg.attention
        modes = CACHE_MODES[cfg.attention]
        self.cache_mode = modes[0] if cache == "auto" else cache
        if self.cache_mode not in modes:
            raise UserError(f"cache {cache!r} does not apply to {cfg.attention} attention; choose one of: "
                            f"auto, {', '.join(modes)}")
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        if refresh_interval is not None and refresh_interval < 1:
            raise UserError(f"refresh_interval must be >= 1 (or None: refresh at block starts only), got {refresh_interval}")
        if cuda_graphs and self.cache_mode == "none":
            raise UserError("cuda_graphs needs the KV cache (its fixed pool is what the graphs read and write); "
                            "use cache='auto' or 'exact'")
        if cuda_graphs and compile:
            raise UserError("cuda_graphs and compile do not combine; choose one")
        if quantize is not None:
            from .quantize import quantize_model
            model = quantize_model(model, quantize)
            self.model = model
        self.net = model.net
        if quantize is None and cpu_linear.applies(self.net):
            self.net = cpu_linear.cpu_linears(self.net)
        if compile:
            # Measured on the 2-core CPU (AR twin, batch 1): 9x slower than eager, because ragged
            # batch and cache shapes keep recompiling. It needs static shape buckets to pay off.
            self.net = torch.compile(self.net, dynamic=True)
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.max_batch = max_batch
        self.refresh_interval = refresh_interval
        # Lookahead rows (engine/lookahead.py) ride in free batch slots; a batch-1 engine gets one.
        self.lookahead = lookahead and cfg.attention == "block" and self.cache_mode != "none"
        self.max_rows = max(max_batch, 2) if self.lookahead else max_batch
        self.lookahead_rows = self.lookahead_hits = 0
        cache_obj = None
        if self.cache_mode != "none":
            budget = kv_budget_tokens or max_batch * cfg.max_seq_len
            page = cfg.block_size if cfg.attention == "block" else 16
            dtype = next(model.net.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            cache_obj = PagedKVCache(cfg.n_layers, cfg.kv_heads, cfg.head_dim, budget, page, model.device, dtype)
        self.cache = cache_obj
        # Decode steps padded to static shape buckets, replayed as CUDA graphs on a CUDA model. On CPU
        # the same padded path runs eagerly: identical tokens, no speed-up (it exists to be tested).
        graphs = GraphedForward(self.net, cache_obj, cfg, self.max_rows) if cuda_graphs else None
        self.runner = ModelRunner(self.net, cache_obj, cfg, graphs)
        self.scheduler = Scheduler(max_batch, cache_obj, self.attention, self.cache_mode,
                                   decode_window=decode_limit(cfg.attention, cfg.block_size) if cache_obj else 0)
        self._heal_masks = HealMasks(model.tokenizer, cfg.vocab_size, model.device)
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}
        self.steps = 0

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Validate and queue one request; raises UserError (and changes nothing) if it is bad."""
        params = params or SamplingParams()
        ws = ""
        if params.heal and isinstance(prompt, str):  # token ids and chats are taken as given
            prompt, ws = split_trailing_whitespace(prompt, ASCII_WHITESPACE)
        head, tail = layout_prompt(self.model, prompt, params.suffix)
        s = resolve(self.model, params, len(head) + len(tail))
        if self.attention == "causal" and not head:
            raise UserError("the prompt is empty; an autoregressive model needs at least one prompt token")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise UserError(f"request id {rid!r} is already in use")
        # A sampling request without a seed gets one now, so that a preempted request restarts with
        # the same randomness and its already-streamed text stays valid.
        seed = params.seed if params.seed is not None or s.temperature == 0 else secrets.randbits(63)
        # A chat turn ends at end-of-turn as well as at EOS.
        stop_ids = frozenset({self.eos_id, self.model.tokenizer.end_id} if is_chat(prompt) else {self.eos_id})
        heal_mask = self._heal_masks(ws) if ws else None
        if heal_mask is None and ws:  # no token fits (not with a byte-level BPE): send it as given
            head, tail = layout_prompt(self.model, prompt + ws, params.suffix)
            s, ws = resolve(self.model, params, len(head) + len(tail)), ""
        req = Request(rid, head, tail, s, seed, params.stream_canvas, self.refresh_interval, stop_ids,
                      heal=ws, heal_mask=heal_mask, lookahead=self.lookahead and s.temperature == 0)
        if self.cache is not None and req.length > self.cache.capacity_tokens:
            raise UserError(f"the request needs {req.length} tokens of KV cache but the engine's budget is "
                            f"{self.cache.capacity_tokens}; raise kv_budget_tokens or lower max_tokens")
        req.set_mask_id(self.mask_id)
        self._requests[rid] = req
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.scheduler.retire(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step loop --------------------------------------------------------------------------
    def step(self) -> list[Event]:
        reqs = self.scheduler.schedule()
        if not reqs:
            return []
        self.steps += 1
        n = len(reqs)
        windows = [r.plan(self.attention, self.cache_mode) for r in reqs]
        canvases, tables, rows = [r.canvas for r in reqs], [r.pages for r in reqs], list(reqs)
        ahead, scratch, borrowed = {}, [None] * n, []
        if self.lookahead:
            for i, r in enumerate(reqs):
                if len(rows) >= self.max_rows:
                    break
                la = lookahead(r, self.attention, self.cache_mode)
                if la is None:
                    continue
                page = []
                if not self.cache.grow(page, 1):  # no page to lend this step: run without
                    break
                borrowed += page
                scratch[i], ahead[i] = page[0], len(rows)
                rows.append(r)
                windows.append(la[0])
                canvases.append(la[1])
                tables.append(r.pages)
                scratch.append(None)
            self.lookahead_rows += len(ahead)
        try:
            logits, valid = self.runner.forward(canvases, windows, tables, scratch if ahead else None)
        finally:
            if borrowed:
                self.cache.release(borrowed)
        B, A = valid.shape
        active = torch.full((B, A), -1, dtype=torch.long)
        for i, (c, w) in enumerate(zip(canvases, windows)):
            active[i, : w.hi - w.lo] = c[w.lo:w.hi]
        if self.attention == "causal":
            masked = valid.clone()  # the one position is the next token, always open
        else:
            masked = valid & (active == self.mask_id)
        fallback = [r.s.fallback_id for r in rows]
        params = StepParams(
            policy=torch.tensor([r.s.policy_id for r in rows]),
            k=torch.tensor([r.topk_k() if j < n else r.next_topk_k() for j, r in enumerate(rows)]),
            threshold=torch.tensor([r.s.threshold for r in rows], dtype=torch.float64),
            temperature=torch.tensor([r.s.temperature for r in rows], dtype=torch.float64),
            top_p=torch.tensor([r.s.top_p for r in rows], dtype=torch.float64),
            # None when no row takes the leftmost fallback: select_commits then skips that part.
            fallback=torch.tensor(fallback) if LEFTMOST in fallback else None,
        )
        used = set(params.policy.tolist())
        prop = propose_batch(logits, self.mask_id, params.temperature, params.top_p,
                             [r.generator for r in rows], valid=valid.to(logits.device),
                             need_margin=MARGIN in used, need_entropy=ENTROPY in used,
                             allowed=self._heal_constraint(reqs, windows[:n]))
        if self.attention == "causal":
            commit = masked  # one open position per row, always written: no ranking to do
        else:
            commit = select_commits(prop, masked.to(logits.device), params, used).cpu()
        tokens = prop.tokens.cpu()
        events = []
        for i, (r, w) in enumerate(zip(reqs, windows)):
            j = ahead.get(i)
            extra = None if j is None else (windows[j], canvases[j], commit[j], tokens[j])
            try:
                events.append(self._advance(r, w, commit[i], tokens[i], extra))
            except Exception as e:  # one request's failure must not take the others down
                r.error = f"{type(e).__name__}: {e}"
                events.append(self._finish(r, "error"))
        return events

    def _heal_constraint(self, reqs: list[Request], windows):
        """propose_batch's `allowed` for the rows whose first generated position is still open and
        healed; None (nothing to pay) when there are none."""
        at = [(i, j, r.heal_mask) for i, (r, w) in enumerate(zip(reqs, windows))
              if r.heal_mask is not None and (j := r.heal_at(self.attention, w)) is not None]
        if not at:
            return None
        rows, cols, masks = zip(*at)
        return torch.tensor(rows), torch.tensor(cols), torch.stack(masks)

    def _advance(self, r: Request, w, commit: torch.Tensor, tokens: torch.Tensor, ahead=None) -> Event:
        """Apply one step's commits to r. ahead: the step's lookahead row (window, canvas, commit,
        tokens), used as the next block's first step when the block ended on the canvas it guessed."""
        r.after_forward(self.attention, self.cache_mode, w)
        if self.attention == "causal":
            r.canvas[r.cur] = tokens[0]
            committed = [r.cur - r.lo]
            r.cur += 1
            done = "stop" if int(tokens[0]) in r.stop_ids else ("length" if r.cur >= r.hi else None)
        else:
            committed = self._commit(r, w, commit, tokens)
            done = self._end_block(r)
            if ahead is not None and done is None:
                wa, canvas, commit_a, tokens_a = ahead
                if r.block == (wa.lo, wa.hi) and torch.equal(r.canvas[wa.start:wa.lo], canvas[wa.start:wa.lo]):
                    self.lookahead_hits += 1
                    r.cached = max(r.cached, wa.lo)  # the lookahead row wrote the finished block's keys
                    committed += self._commit(r, wa, commit_a, tokens_a)
                    done = self._end_block(r)
        ids, _ = r.committed_prefix()
        text = r.text_of(self.model.tokenizer.decode(ids, skip_special=True))
        if ids and r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        for stop in r.s.stop:
            at = text.find(stop)
            if at >= 0:
                text, done = text[:at], "stop"
        if done:
            return self._finish(r, done, text, committed)
        hold = max((len(x) for x in r.s.stop), default=1) - 1
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for the rest
            safe -= 1
        delta = text[r.emitted:safe] if safe > r.emitted else ""
        r.emitted = max(r.emitted, safe)
        return Event(r.id, delta, False, None, *self._canvas(r, committed))

    @staticmethod
    def _commit(r: Request, w, commit: torch.Tensor, tokens: torch.Tensor) -> list[int]:
        """Write a block step's commits into r's canvas; their positions relative to r.lo."""
        idx = commit.nonzero().flatten()
        r.canvas[w.lo + idx] = tokens[idx]
        r.step_in_block += 1
        if r.lookahead:
            r.draft = tokens[: w.hi - w.lo].clone()
        return (w.lo - r.lo + idx).tolist()

    @staticmethod
    def _end_block(r: Request) -> str | None:
        """If r's block is complete: "stop" or "length" when r is done, else move to the next block."""
        if not r.block_done():
            return None
        b, e = r.block
        if bool(torch.isin(r.canvas[b:e], torch.tensor(list(r.stop_ids))).any()):
            return "stop"
        if r.span_idx + 1 >= len(r.spans):
            return "length"
        r.span_idx += 1
        r._start_block()
        return None

    def _canvas(self, r: Request, committed: list[int]):
        if not r.stream_canvas:
            return None, None
        return r.generated(), committed

    def _finish(self, r: Request, reason: str, text: str | None = None, committed: list[int] | None = None) -> Event:
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        ids, _ = r.committed_prefix()
        raw = self.model.tokenizer.decode(ids, skip_special=True)
        full = r.text_of(raw)
        if text is None:
            text = full
        elif text != full:  # a stop string cut the text (not EOS, which keeps the generated ids)
            # The ids are what the model wrote: the healed whitespace it rewrote, then the cut text.
            written = raw[: len(raw) - len(full)] + text
            ids = self.model.tokenizer.encode(written, allow_special=False) if written else []
        self.scheduler.retire(r)
        self._requests.pop(r.id, None)
        out = self._output(r, text, ids)
        delta = text[r.emitted:] if len(text) > r.emitted else ""
        r.emitted = len(text)
        return Event(r.id, delta, True, out, *self._canvas(r, committed or []))

    def _output(self, r: Request, text: str, ids: list[int]) -> RequestOutput:
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
