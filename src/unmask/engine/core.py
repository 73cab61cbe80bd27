"""The engine core: token ids in, token events out.

core (this file) -> scheduler (admission, KV budget) -> runner (ragged batch, model call)
                 -> policies (what to commit; pure functions in unmask.sampling.policies)
                 -> decode plan (windows, commits, cache bookkeeping; unmask.decode)

Every `step()` runs one batched forward over all running requests; requests join and leave
between steps. How a model is decoded (block-causal with the exact cache, causal, full attention
with Fast-dLLM's approximate cache, uncached) is the decode plan's business: the core asks it.
Text (prompts, chat templates, healing, detokenising, stop strings) is the frontend's
(`unmask.frontend`); the public `Engine` (engine.py) is the frontend over this core.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..decode import make_plan, remask
from ..errors import UserError
from ..sampling.penalties import penalise
from ..sampling.policies import ENTROPY, LEARNED, LEFTMOST, MARGIN, StepParams, propose_batch, select_commits
from . import cpu_linear, tensor_parallel
from .cuda_graphs import GraphedForward
from .kv_cache import PagedKVCache
from .request import Request
from .runner import ModelRunner
from .scheduler import Scheduler


def default_kv_budget(cfg, max_batch: int, dtype: torch.dtype, device) -> int:
    """Tokens of KV cache when the caller names none: room for max_batch full contexts, but at most
    half the memory free on the device (a 7B full-context cache for 16 requests would not fit), and
    at least one full context."""
    from ..families.load import available_memory

    want = max_batch * cfg.max_seq_len
    free = available_memory(torch.device(device))
    if free is None:
        return want
    per_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return max(cfg.max_seq_len, min(want, free // 2 // per_token))


BACKENDS = ("torch", "llama.cpp")
LLAMA_WEIGHTS = ("f32", "f16", "q8_0")  # the llama.cpp backend's `quantize` values (None: f32)


def _check_llama_options(model, quantize, compile, cuda_graphs) -> None:
    if quantize is not None and quantize not in LLAMA_WEIGHTS:
        raise UserError(f"quantize={quantize!r} does not apply to backend 'llama.cpp'; its weights are one of "
                        f"{', '.join(LLAMA_WEIGHTS)}")
    if compile or cuda_graphs:
        raise UserError("backend 'llama.cpp' runs its own kernels: drop compile / cuda_graphs")
    if model.device.type != "cpu":
        raise UserError(f"backend 'llama.cpp' runs on the CPU; the model is on {model.device}")


@dataclass
class TokenEvent:
    """What one step did to one request: the canvas positions it committed (relative to the
    generated region) and, when the core finished it, why ("stop", "length" or "error")."""

    request: Request
    committed: list[int]
    done: str | None = None
    revised: list[int] | None = None  # positions sent back to mask by this step (decode/remask.py)


class EngineCore:
    def __init__(self, model, *, max_batch: int = 16, kv_budget_tokens: int | None = None, cache: str = "auto",
                 refresh_interval: int | None = None, quantize: str | None = None, compile: bool = False,
                 cuda_graphs: bool = False, lookahead: bool = True, prefill_chunk: int | None = 2048,
                 backend: str = "torch", lookahead_gate: float | None = None):
        self.model = model
        cfg = model.config
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        if refresh_interval is not None and refresh_interval < 1:
            raise UserError(f"refresh_interval must be >= 1 (or None: refresh at block starts only), got {refresh_interval}")
        # How this model is decoded (unmask.decode): windows, mask pattern, logit shift, commits.
        self.plan = plan = make_plan(cfg, cache, refresh_interval, prefill_chunk)
        self.cache_mode = plan.name
        if cuda_graphs and not plan.uses_cache:
            raise UserError("cuda_graphs needs the KV cache (its fixed pool is what the graphs read and write); "
                            "use cache='auto' or 'exact'")
        if cuda_graphs and compile:
            raise UserError("cuda_graphs and compile do not combine; choose one")
        if backend not in BACKENDS:
            raise UserError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        llama = backend == "llama.cpp"
        if llama:
            _check_llama_options(model, quantize, compile, cuda_graphs)
        elif quantize in LLAMA_WEIGHTS:
            raise UserError(f"quantize={quantize!r} is a llama.cpp weight type; use it with backend='llama.cpp', "
                            f"or quantize='int8wo' on the torch backend")
        if quantize is not None and not llama:
            from .quantize import quantize_model
            model = quantize_model(model, quantize)
            self.model = model
        self.net = model.net
        tp = tensor_parallel.degree(self.net)
        if tp > 1 and (quantize is not None or compile or cuda_graphs or llama):
            raise UserError("a tensor-parallel model runs the plain torch forward: drop quantize / compile / "
                            "cuda_graphs / backend 'llama.cpp'")
        if quantize is None and not llama and tp == 1 and cpu_linear.applies(self.net):
            self.net = cpu_linear.cpu_linears(self.net)
        # compile on a CPU: decode steps padded to static buckets, each compiled once (cpu_compile.py).
        # Elsewhere (or without a cache to bucket) the whole net under torch.compile, as before; that
        # measured 9x slower than eager on the CPU (ragged shapes keep recompiling).
        cpu_steps = compile and plan.uses_cache and plan.decode_window > 0 and model.device.type == "cpu"
        if compile and not cpu_steps:
            self.net = torch.compile(self.net, dynamic=True)
        self.mask_id, self.eos_id = cfg.mask_token_id, cfg.eos_token_id
        self.max_batch = max_batch
        # Lookahead rows (engine/lookahead.py) ride in free batch slots; a batch-1 engine gets one.
        self.lookahead = lookahead and plan.lookahead
        if lookahead_gate is not None and not 0.0 <= lookahead_gate <= 1.0:
            raise UserError(f"lookahead_gate must be in [0, 1] (or None), got {lookahead_gate}")
        if self.lookahead:
            plan.lookahead_gate = lookahead_gate
        self.max_rows = max(max_batch, 2) if self.lookahead else max_batch
        self.lookahead_rows = self.lookahead_hits = 0
        cache_obj = None
        if plan.uses_cache:
            page = plan.page_size
            dtype = next(model.net.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            budget = kv_budget_tokens or default_kv_budget(cfg, max_batch, dtype, model.device)
            cache_obj = PagedKVCache(cfg.n_layers, tensor_parallel.local_kv_heads(self.net, cfg), cfg.head_dim,
                                     budget, page, model.device, dtype, storage=not llama)
        self.cache = cache_obj
        # rank 0 of a tensor-parallel model: the other ranks mirror its cache and run its forwards
        self.tp_driver = tensor_parallel.Driver.start(cache_obj, model.device) if tp > 1 else None
        if llama:
            from .llamacpp.runner import LlamaCppRunner
            if cache_obj is None:
                raise UserError(f"backend 'llama.cpp' needs the exact KV cache; cache={cache!r} has none")
            self.runner = LlamaCppRunner(model.net, cfg, plan, weights=quantize or "f32", max_batch=max_batch,
                                         max_rows=self.max_rows, kv_tokens=cache_obj.capacity_tokens)
            self.scheduler = Scheduler(max_batch, cache_obj, plan, on_release=self.runner.release)
        else:
            # Decode steps padded to static shape buckets, replayed as CUDA graphs on a CUDA model. On CPU
            # the same padded path runs eagerly: identical tokens, no speed-up (it exists to be tested).
            graphs = GraphedForward(self.net, cache_obj, cfg, self.max_rows, plan.decode_window) if cuda_graphs else None
            if cpu_steps:
                from .cpu_compile import CompiledForward
                graphs = CompiledForward(model.net, cache_obj, cfg, self.max_rows, plan.decode_window)
            self.runner = ModelRunner(self.net, cache_obj, cfg, plan, graphs,
                                      run=self.tp_driver.run if self.tp_driver is not None else None)
            self.scheduler = Scheduler(max_batch, cache_obj, plan)
        self._requests: dict[str, Request] = {}
        self.steps = 0

    # ---- requests -------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request the frontend built; raises UserError (and changes nothing) if it cannot run."""
        if req.id in self._requests:
            raise UserError(f"request id {req.id!r} is already in use")
        if self.cache is not None and req.length > self.cache.capacity_tokens:
            raise UserError(f"the request needs {req.length} tokens of KV cache but the engine's budget is "
                            f"{self.cache.capacity_tokens}; raise kv_budget_tokens or lower max_tokens")
        if req.s.remask > 0 and self.plan.single_open:
            raise UserError("remask applies to diffusion models; an autoregressive model commits each token once, "
                            "left to right, and never revises it")
        if req.s.remask > 0 and (getattr(self.runner, "graphs", None) is not None or self.backend != "torch"):
            raise UserError("remask adds a verification row per request, which the engine's fixed-shape steps "
                            "(cuda_graphs, compile on a CPU) and the llama.cpp backend do not carry; use an engine "
                            "without them")
        req.set_mask_id(self.mask_id)
        self._requests[req.id] = req
        self.scheduler.add(req)

    def finish(self, req: Request, reason: str) -> None:
        """Take a request out (done, stopped by its frontend, or aborted)."""
        req.finish_reason, req.finished_at = reason, time.perf_counter()
        self.scheduler.retire(req)
        self._requests.pop(req.id, None)

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
    def step(self) -> list[TokenEvent]:
        """One batched forward over every running request; a TokenEvent per request."""
        reqs = self.scheduler.schedule()
        if not reqs:
            return []
        self.steps += 1
        n = len(reqs)
        plan = self.plan
        windows = [plan.window(r) for r in reqs]
        canvases, tables, rows = [r.canvas for r in reqs], [r.pages for r in reqs], list(reqs)
        ahead, scratch, borrowed = {}, [None] * n, []
        if self.lookahead:
            for i, r in enumerate(reqs):
                if len(rows) >= self.max_rows:
                    break
                la = plan.extra_row(r)
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
        # remask (decode/remask.py): a row per request checking one committed position, hidden
        hidden = self._verify_rows(reqs, windows, canvases, tables, rows, scratch, borrowed)
        try:
            # A runner with per-request state of its own (llama.cpp's sequences) is told whose rows these are.
            extra = {"owners": rows} if getattr(self.runner, "needs_owners", False) else {}
            logits, valid = self.runner.forward(canvases, windows, tables, scratch if ahead or hidden else None, **extra)
        finally:
            if borrowed:
                self.cache.release(borrowed)
        B, A = valid.shape
        active = torch.full((B, A), -1, dtype=torch.long)
        for i, (c, w) in enumerate(zip(canvases, windows)):
            active[i, : w.hi - w.lo] = c[w.lo:w.hi]
        masked = valid & (active == self.mask_id)
        verify = {j for j, _ in hidden.values()}
        fallback = [r.s.fallback_id for r in rows]
        params = StepParams(
            policy=torch.tensor([r.s.policy_id for r in rows]),
            k=torch.tensor([r.topk_k() if j < n or j in verify else r.next_topk_k() for j, r in enumerate(rows)]),
            threshold=torch.tensor([r.s.threshold for r in rows], dtype=torch.float64),
            # a verification row only needs its logits: greedy, drawing none of the request's noise
            temperature=torch.tensor([0.0 if j in verify else r.s.temperature for j, r in enumerate(rows)],
                                     dtype=torch.float64),
            top_p=torch.tensor([r.s.top_p for r in rows], dtype=torch.float64),
            # None when no row takes the leftmost fallback: select_commits then skips that part.
            fallback=torch.tensor(fallback) if LEFTMOST in fallback else None,
            rule=self.model.commit_rule,
        )
        used = set(params.policy.tolist())
        if A == 0:  # only prefill chunks: nothing to score
            empty = torch.zeros(B, 0, dtype=torch.long)
            return self._apply(reqs, windows, ahead, canvases, empty.bool(), empty)
        logits = penalise(logits, rows, self.mask_id)  # repetition / presence / frequency, where asked
        top_k = [r.s.top_k for r in rows]
        prop = propose_batch(logits, self.mask_id, params.temperature, params.top_p,
                             [None if j in verify else r.generator for j, r in enumerate(rows)],
                             valid=valid.to(logits.device),
                             need_margin=bool({MARGIN, LEARNED} & used), need_entropy=bool({ENTROPY, LEARNED} & used),
                             allowed=self._heal_constraint(reqs, windows[:n]), top_k=top_k if any(top_k) else None)
        if plan.single_open:
            commit = masked  # one open position per row, always written: no ranking to do
        else:
            commit = select_commits(prop, masked.to(logits.device), params, used).cpu()
        conf = prop.confidence.cpu() if self.lookahead or hidden or any(r.s.remask > 0 for r in reqs) else None
        tokens = prop.tokens.cpu()
        if any(r.constraint is not None or r.hole_constraints for r in reqs):
            commit, tokens = self._constrain(reqs, windows, logits, masked, commit, tokens)
        revised = {i: [p - reqs[i].lo] for i, (j, p) in hidden.items()
                   if remask.judge(reqs[i], p, logits[j, p - windows[j].lo])}
        return self._apply(reqs, windows, ahead, canvases, commit, tokens, conf, revised)

    def _verify_rows(self, reqs, windows, canvases, tables, rows, scratch, borrowed) -> dict[int, tuple[int, int]]:
        """Append a verification row for each request with remask that has a committed position to
        check: its own window on a copy of its canvas with that position masked, writing its keys to
        pages borrowed for this step. {request row: (verification row, absolute position)}."""
        hidden = {}
        for i, (r, w) in enumerate(zip(reqs, windows)):
            if r.s.remask <= 0 or (p := remask.pick(r, w)) is None:
                continue
            pages = []
            if self.cache is not None:
                need = -(-(w.end - w.start) // self.cache.page_size)
                if not self.cache.grow(pages, need):  # no pages to lend this step: check next step
                    continue
                borrowed += pages
            c = r.canvas.clone()
            c[p] = self.mask_id
            hidden[i] = (len(rows), p)
            rows.append(r)
            windows.append(w)
            canvases.append(c)
            tables.append(r.pages)
            scratch.append(pages or None)
        return hidden

    def _constrain(self, reqs, windows, logits, masked, commit, tokens):
        """The grammar stage (structured/stage.py) for the rows with a response format."""
        from ..structured.stage import constrain, constrain_holes

        commit, tokens = commit.clone(), tokens.clone()
        for i, (r, w) in enumerate(zip(reqs, windows)):
            if r.constraint is not None or r.hole_constraints:
                stage = constrain if r.constraint is not None else constrain_holes
                try:
                    commit[i], tokens[i] = stage(r, w, logits[i], masked[i], commit[i], tokens[i], self.eos_id)
                except Exception as e:  # this request fails alone; _apply reports it
                    r.error = f"{type(e).__name__}: {e}"
                    commit[i] = False
        return commit, tokens

    def _apply(self, reqs, windows, ahead, canvases, commit, tokens, conf=None, revised=None) -> list[TokenEvent]:
        events = []
        for i, (r, w) in enumerate(zip(reqs, windows)):
            if r.error is not None:  # failed in the grammar stage
                self.plan.after_forward(r, w)
                events.append(TokenEvent(r, [], "error"))
                continue
            j = ahead.get(i)
            extra = None if j is None else (windows[j], canvases[j], commit[j], tokens[j])
            try:
                self.plan.after_forward(r, w)
                applied = self.plan.apply(r, w, commit[i], tokens[i], extra)
                self.lookahead_hits += applied.extra_used
                if conf is not None and r.draft is not None:  # the drafts' confidences (lookahead's gate)
                    r.draft_conf = conf[j if applied.extra_used else i, : len(r.draft)]
                if r.s.remask > 0:
                    remask.record(r, w, applied.committed, conf[i])
                events.append(TokenEvent(r, applied.committed, applied.done, (revised or {}).get(i)))
            except Exception as e:  # one request's failure must not take the others down
                r.error = f"{type(e).__name__}: {e}"
                events.append(TokenEvent(r, [], "error"))
        return events

    def _heal_constraint(self, reqs: list[Request], windows):
        """propose_batch's `allowed` for the rows whose first generated position is still open and
        healed; None (nothing to pay) when there are none."""
        at = [(i, j, r.heal_mask) for i, (r, w) in enumerate(zip(reqs, windows))
              if r.heal_mask is not None and (j := r.heal_at(w)) is not None]
        if not at:
            return None
        rows, cols, masks = zip(*at)
        return torch.tensor(rows), torch.tensor(cols), torch.stack(masks)
