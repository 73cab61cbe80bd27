"""A model runner on llama.cpp's library: the engine's scheduler, decode plans and policies
unchanged, the forward run by llama.cpp on a GGUF copy of the network (export.py).

The engine hands a runner rows: a request's canvas and a window [start, end) of positions to feed,
whose keys must see the request's clean prefix [0, start) from the cache. llama.cpp keeps one KV
cache whose cells carry sequence ids; a token sees exactly the cells of its first sequence id
(non-causal attention), or those at or before its position (causal). Block-causal attention is
built from that:

* each request owns a persistent sequence P holding its clean prefix;
* a row is cut into segments at block boundaries. A decode call takes up to two segments of each
  row: the first gets the sequence ids {S, P}, where the temporary S starts as a copy of P's prefix
  (shared cells, nothing copied) and decides what the token sees; the second gets {P}. The first
  therefore sees the prefix and itself, the second the prefix, the first and itself: the block
  pattern. A decode step carries at most two segments per row (a finished block and the next one),
  so every row of a step goes into one call; a prompt of many blocks takes a call per two blocks.
  (Only two ids per token: llama.cpp keeps a token's ids in an unordered set, so which one decides
  is found out once by `_probe`, and for two ids it is well defined.)
* after the step the window's cells stay in P. At the request's next forward, P is cut back to the
  clean prefix the decode plan reports (`r.cached`): the current block's noisy cells are dropped and
  a finished block's cells, computed from its final tokens, stay (the exact cache of BlockExactPlan).
  A second row of the same request (block lookahead) writes into its own temporary base sequence;
  when its guess is taken, its cells are what P keeps.

Inputs are embeddings computed by the network itself (`Transformer.input_embeddings`), so
`token_shift`'s neighbour tables stay in PyTorch. Causal models (CausalPlan) run with causal
attention and one segment per row. Plans without an exact cache (full attention) are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...decode import Window
from ...decode.plans import BlockExactPlan, CausalPlan
from ...errors import UserError
from ..runner import window_left_context
from .export import runner_gguf
from .library import ContextOptions, LlamaContext

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class _Seqs:
    """A request's sequences: P, how far P is known clean, and last step's rows as
    (base sequence, start, tokens fed)."""

    p: int
    valid: int = 0
    last: list[tuple[int, int, list[int]]] = field(default_factory=list)


@dataclass
class _Row:
    index: int  # row index in the engine's batch
    base: int  # sequence that ends up holding all of the row's cells
    start: int
    segments: list[tuple[int, int]]  # [a, b) position ranges, in order
    offset: int  # first token of the row in the step's embedding array
    outputs: dict[int, int]  # position whose output is scored -> its index among the window's scored positions


class LlamaCppRunner:
    needs_owners = True  # forward() takes each row's request: P and last step's rows are kept per request

    def __init__(self, net, cfg, plan, *, weights: str = "f32", max_rows: int, kv_tokens: int,
                 n_threads: int | None = None, n_ubatch: int = 512):
        if isinstance(plan, BlockExactPlan):
            causal, self.segment = False, plan.block_size
        elif isinstance(plan, CausalPlan) and plan.uses_cache:
            causal, self.segment = True, None
        else:
            raise UserError(f"backend 'llama.cpp' runs block-causal and causal models on the exact cache; this "
                            f"model decodes with the {plan.name!r} cache ({type(plan).__name__}): use backend='torch'")
        if self.segment is not None and self.segment > n_ubatch:
            raise UserError(f"block size {self.segment} exceeds the llama.cpp batch of {n_ubatch} tokens")
        self.net, self.cfg, self.plan = net, cfg, plan
        self.n_ubatch = n_ubatch
        self.path = runner_gguf(net, cfg, weights)
        extra = max_rows * (plan.decode_window + 2 * cfg.block_size) + n_ubatch
        n_ctx = -(-(kv_tokens + extra) // 256) * 256
        self.ctx = LlamaContext(str(self.path), ContextOptions(
            n_ctx=n_ctx, n_seq_max=MAX_SEQ, n_ubatch=n_ubatch, n_threads=n_threads or torch.get_num_threads(),
            kv_f32=weights == "f32", causal=causal))
        self._probe()
        self._free = list(range(MAX_SEQ - 1, -1, -1))
        self._seqs: dict[str, _Seqs] = {}
        self.device = torch.device("cpu")
        self.decode_calls = 0

    # ---- sequence ids ----------------------------------------------------------------------------
    def _take(self) -> int:
        if not self._free:
            raise RuntimeError("llama.cpp runner: out of sequence ids")
        return self._free.pop()

    def _give(self, seq: int) -> None:
        self.ctx.seq_rm(seq)
        self._free.append(seq)

    def release(self, req) -> None:
        """Forget a request that finished, was aborted or was preempted."""
        st = self._seqs.pop(req.id, None)
        if st is None:
            return
        for base, _, _ in st.last:
            if base != st.p:
                self._give(base)
        self._give(st.p)

    def _reconcile(self, req, st: _Seqs) -> None:
        """Cut P back to the clean prefix [0, req.cached) after last step's rows."""
        target = req.cached
        canvas = None
        keep = None
        for base, start, toks in st.last:
            if start <= target <= start + len(toks):
                if canvas is None:
                    canvas = req.canvas[: start + len(toks)].tolist()
                if canvas[start:target] == toks[: target - start]:
                    keep = (base, start)
                    break
        if st.last:
            starts = [s for _, s, _ in st.last]
            if keep is None:
                st.valid = min(st.valid, min(starts))
                self.ctx.seq_rm(st.p, st.valid, -1)
            else:
                base, start = keep
                if base != st.p:
                    self.ctx.seq_rm(st.p, start, -1)
                    self.ctx.seq_cp(base, st.p, start, target)
                st.valid = target
                self.ctx.seq_rm(st.p, target, -1)
            for base, _, _ in st.last:
                if base != st.p:
                    self._give(base)
            st.last = []
        st.valid = min(st.valid, target)

    # ---- the forward -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, canvases: list[torch.Tensor], windows: list[Window], tables=None, scratch=None,
                owners=None):
        if owners is None:
            raise ValueError("the llama.cpp runner needs each row's request (owners=)")
        shift = self.plan.logit_shift
        rows: list[_Row] = []
        ids, prev, gap, pos = [], [], [], []
        offset = 0
        seen: set[str] = set()
        for i, (req, c, w) in enumerate(zip(owners, canvases, windows)):
            st = self._seqs.get(req.id)
            if st is None:
                st = self._seqs[req.id] = _Seqs(self._take())
            if req.id not in seen:  # the request's ordinary row: it writes into P
                seen.add(req.id)
                self._reconcile(req, st)
                if w.start > st.valid:
                    raise RuntimeError(f"llama.cpp runner: window starts at {w.start} but the cache holds "
                                       f"only [0, {st.valid}) of request {req.id}")
                self.ctx.seq_rm(st.p, w.start, -1)
                st.valid = min(st.valid, w.start)
                base = st.p
            else:  # an extra row (block lookahead): its own base, sharing P's prefix
                base = self._take()
                self.ctx.seq_cp(st.p, base, 0, w.start)
            n = w.end - w.start
            toks = c[w.start:w.end]
            st.last.append((base, w.start, toks.tolist()))
            ids.append(toks)
            pos.append(torch.arange(w.start, w.end))
            if self.cfg.token_shift:
                p, g = window_left_context(c, w.start, w.end, self.cfg.mask_token_id, self.cfg.pad_token_id)
                prev.append(p)
                gap.append(g)
            # Only still-masked positions are scored (the policies commit nothing else), so only
            # their outputs go through the vocabulary projection.
            scored = c[w.lo:w.hi].eq(self.cfg.mask_token_id).nonzero().flatten().tolist()
            rows.append(_Row(i, base, w.start, self._segments(w.start, w.end), offset,
                             {w.lo + k - shift: k for k in scored}))
            offset += n
        ids_t = torch.cat(ids)[None]
        embd = self.net.input_embeddings(
            ids_t, torch.cat(prev)[None] if prev else None, torch.cat(gap)[None] if gap else None)[0]
        embd = embd.float().cpu().numpy()
        pos_np = torch.cat(pos).numpy().astype(np.int32)
        B = len(windows)
        A = max(w.hi - w.lo for w in windows)
        V = self.cfg.vocab_size
        logits = torch.zeros(B, A, V)
        # Every scored position is valid, as in the torch runner (a sampling row's noise is drawn for
        # all of them); positions that are not masked keep zero logits and are never committed.
        valid = torch.zeros(B, A, dtype=torch.bool)
        for i, w in enumerate(windows):
            valid[i, : w.hi - w.lo] = True
        for call in self._calls(rows):
            self._run(call, embd, pos_np, logits, valid)
        return logits, valid

    def _segments(self, start: int, end: int) -> list[tuple[int, int]]:
        if self.segment is None:  # causal: any split is exact; keep each piece within one call
            n = self.n_ubatch
            return [(a, min(a + n, end)) for a in range(start, end, n)]
        bs = self.segment
        cuts = sorted({start, end, *range((start // bs + 1) * bs, end, bs)})
        return list(zip(cuts[:-1], cuts[1:]))

    def _calls(self, rows: list[_Row]):
        """Group (row, segments) into decode calls of at most n_ubatch tokens, each row giving at most
        `self.pair` segments per call (see _probe). A row's segments stay in order; when a row spans
        calls, its later segments see the earlier ones through its base sequence."""
        pending = [(r, list(r.segments)) for r in rows]
        per_row = self.pair if self.segment is not None else 1 << 30
        while pending:
            call, tokens, rest = [], 0, []
            for r, segs in pending:
                take = []
                for a, b in segs[:per_row]:
                    if tokens + (b - a) > self.n_ubatch:
                        break
                    take.append((a, b))
                    tokens += b - a
                if take:
                    call.append((r, take))
                if len(take) < len(segs):
                    rest.append((r, segs[len(take):]))
            if not call:
                raise RuntimeError("llama.cpp runner: a segment does not fit one decode call")
            yield call
            pending = rest

    def _run(self, call, embd, pos_np, logits, valid) -> None:
        sel, seq_ids, out, where, temps = [], [], [], [], []
        for r, segs in call:
            if len(segs) == 2:  # the first segment must not see the second: its own sequence S
                s = self._take()
                temps.append(s)
                self.ctx.seq_cp(r.base, s, 0, segs[0][0])
                first = [r.base, s] if self.last_decides else [s, r.base]
            scored = r.outputs
            for m, (a, b) in enumerate(segs):
                ids = first if m == 0 and len(segs) == 2 else [r.base]
                for p in range(a, b):
                    sel.append(r.offset + p - r.start)
                    seq_ids.append(ids)
                    k = scored.get(p)
                    out.append(0 if k is None else 1)
                    if k is not None:
                        where.append((r.index, k))
        n = np.asarray([len(x) for x in seq_ids], dtype=np.int32)
        ids_np = np.zeros((len(sel), 2), dtype=np.int32)
        for i, x in enumerate(seq_ids):
            ids_np[i, : len(x)] = x
        try:
            got = self.ctx.decode(embd[sel], pos_np[sel], ids_np, n, np.asarray(out, dtype=np.int8))
        finally:
            for t in temps:
                self._give(t)
        self.decode_calls += 1
        if where:
            bi = torch.tensor([w[0] for w in where])
            ai = torch.tensor([w[1] for w in where])
            logits[bi, ai] = torch.from_numpy(got)

    def _probe(self) -> None:
        """Which of a token's two sequence ids decides what it sees. llama.cpp documents the first,
        but its batch keeps a token's ids in an unordered set, so the order that arrives depends on
        the C++ library (libstdc++: the last one passed). Two tokens at positions 0 and 1 tell: token
        0 in {S, P} must not see token 1 in {P}. Neither order working leaves one segment per row
        per call (slower, still exact)."""
        self.pair, self.last_decides = 1, True
        if self.segment is None:
            return
        g = torch.Generator().manual_seed(0)
        e = (torch.randn(2, self.ctx.n_embd, generator=g) * 0.5).numpy()
        pos = np.array([0, 1], dtype=np.int32)
        one = np.ones(1, dtype=np.int8)
        self.ctx.clear()
        alone = self.ctx.decode(e[:1], pos[:1], np.array([[0]], np.int32), np.array([1], np.int32), one)
        for last in (True, False):
            self.ctx.clear()
            ids = np.array([[0, 1] if last else [1, 0], [0, 0]], np.int32)
            got = self.ctx.decode(e, pos, ids, np.array([2, 1], np.int32), np.array([1, 0], np.int8))
            if np.allclose(got, alone, rtol=1e-3, atol=1e-3):
                self.pair, self.last_decides = 2, last
                break
        self.ctx.clear()

    def close(self) -> None:
        self.ctx.close()
