"""A model runner on llama.cpp's library: the engine's scheduler, decode plans and policies
unchanged, the forward run by llama.cpp on a GGUF copy of the network (export.py).

The engine hands a runner rows: a request's canvas and a window [start, end) of positions to feed,
whose keys must see the request's clean prefix [0, start) from the cache. llama.cpp keeps one KV
cache whose cells carry sequence ids; a token sees exactly the cells of its first sequence id
(non-causal attention), or those at or before its position (causal). Block-causal attention is
built from that:

* each request owns a persistent sequence P holding its clean prefix;
* a row is cut into segments at block boundaries. A decode call takes up to CLASSES segments of a
  row: segment m of n gets the sequence ids {S_m, ..., S_{n-2}, P}, where each temporary S_j starts
  as a copy of P's prefix (shared cells, nothing copied) and S_m decides what the token sees. So
  segment m sees the prefix and segments <= m: the block pattern. A decode step carries at most two
  segments per row (a finished block and the next one), so every row of a step goes into one call;
  a prompt of many blocks takes a call per CLASSES blocks. llama.cpp keeps a token's ids in an
  unordered set, so which one decides is found out once by `_probe` (with libstdc++: the id passed
  last, when the ids fall in distinct residue classes mod CLASSES, which the id pool ensures);
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
PER_CONTEXT = 4  # requests per llama.cpp context (see _Group)
CLASSES = 13  # residue classes of sequence ids (see _probe)


class _Group:
    """One llama.cpp context and its sequence ids, serving up to PER_CONTEXT requests. Every request of a
    group shares its KV pool, and llama.cpp's attention spans the whole pool (masked per sequence),
    so requests are spread over several groups: each token then attends over its own group's cells
    only, at the price of one decode call per group and step."""

    def __init__(self, ctx: LlamaContext):
        self.ctx = ctx
        # Free ids by residue class mod CLASSES: a token's ids must fall in distinct classes (see _probe).
        self.free = [[i for i in range(MAX_SEQ - 1, -1, -1) if i % CLASSES == c] for c in range(CLASSES)]
        self.members = 0

    @property
    def n_free(self) -> int:
        return sum(len(f) for f in self.free)

    def take(self, avoid: set[int] = frozenset()) -> int | None:
        """A free id whose class is not in `avoid` (from the fullest class); None if there is none."""
        best = max((c for c in range(CLASSES) if c not in avoid and self.free[c]), key=lambda c: len(self.free[c]),
                   default=None)
        return None if best is None else self.free[best].pop()

    def must_take(self) -> int:
        seq = self.take()
        if seq is None:
            raise RuntimeError("llama.cpp runner: out of sequence ids")
        return seq

    def give(self, seq: int) -> None:
        self.ctx.seq_rm(seq)
        self.free[seq % CLASSES].append(seq)


@dataclass
class _Seqs:
    """A request's group, its sequence P, how far P is known clean, and last step's rows as
    (base sequence, start, tokens fed)."""

    group: _Group
    p: int
    valid: int = 0
    last: list[tuple[int, int, list[int]]] = field(default_factory=list)


@dataclass
class _Row:
    index: int  # row index in the engine's batch
    group: _Group
    base: int  # sequence that ends up holding all of the row's cells
    start: int
    segments: list[tuple[int, int]]  # [a, b) position ranges, in order
    offset: int  # first token of the row in the step's embedding array
    outputs: dict[int, int]  # position whose output is scored -> its index among the window's scored positions


class LlamaCppRunner:
    needs_owners = True  # forward() takes each row's request: P and last step's rows are kept per request

    def __init__(self, net, cfg, plan, *, weights: str = "f32", max_batch: int, max_rows: int, kv_tokens: int,
                 n_threads: int | None = None, n_ubatch: int = 512, per_context: int | None = None):
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
        per = per_context or PER_CONTEXT
        per = max(1, min(per, max_batch))
        n_groups = -(-max_batch // per)
        rows = -(-max_rows // n_groups)  # rows one group may carry in a step
        cells = min(kv_tokens, per * cfg.max_seq_len) + rows * (plan.decode_window + 2 * cfg.block_size) + n_ubatch
        threads = n_threads or torch.get_num_threads()
        opts = ContextOptions(n_ctx=-(-cells // 256) * 256, n_seq_max=MAX_SEQ, n_ubatch=n_ubatch, n_threads=threads,
                              kv_f32=weights == "f32", causal=causal)
        self.groups = [_Group(LlamaContext(str(self.path), opts)) for _ in range(n_groups)]
        self._probe(self.groups[0].ctx)
        self._seqs: dict[str, _Seqs] = {}
        self.device = torch.device("cpu")
        self.decode_calls = 0

    # ---- requests and their sequences ------------------------------------------------------------
    def _admit(self, req) -> _Seqs:
        g = min(self.groups, key=lambda g: g.members)
        g.members += 1
        st = self._seqs[req.id] = _Seqs(g, g.must_take())
        return st

    def release(self, req) -> None:
        """Forget a request that finished, was aborted or was preempted."""
        st = self._seqs.pop(req.id, None)
        if st is None:
            return
        for base, _, _ in st.last:
            if base != st.p:
                st.group.give(base)
        st.group.give(st.p)
        st.group.members -= 1

    def _reconcile(self, req, st: _Seqs) -> None:
        """Cut P back to the clean prefix [0, req.cached) after last step's rows."""
        ctx = st.group.ctx
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
                ctx.seq_rm(st.p, st.valid, -1)
            else:
                base, start = keep
                if base != st.p:
                    ctx.seq_rm(st.p, start, -1)
                    ctx.seq_cp(base, st.p, start, target)
                st.valid = target
                ctx.seq_rm(st.p, target, -1)
            for base, _, _ in st.last:
                if base != st.p:
                    st.group.give(base)
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
            st = self._seqs.get(req.id) or self._admit(req)
            ctx = st.group.ctx
            if req.id not in seen:  # the request's ordinary row: it writes into P
                seen.add(req.id)
                self._reconcile(req, st)
                if w.start > st.valid:
                    raise RuntimeError(f"llama.cpp runner: window starts at {w.start} but the cache holds "
                                       f"only [0, {st.valid}) of request {req.id}")
                ctx.seq_rm(st.p, w.start, -1)
                st.valid = min(st.valid, w.start)
                base = st.p
            else:  # an extra row (block lookahead): its own base, sharing P's prefix
                base = st.group.must_take()
                ctx.seq_cp(st.p, base, 0, w.start)
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
            rows.append(_Row(i, st.group, base, w.start, self._segments(w.start, w.end), offset,
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
        for g in self.groups:
            mine = [r for r in rows if r.group is g]
            for call in self._calls(g, mine) if mine else ():
                self._run(g, call, embd, pos_np, logits, valid)
        return logits, valid

    def _segments(self, start: int, end: int) -> list[tuple[int, int]]:
        if self.segment is None:  # causal: any split is exact; keep each piece within one call
            n = self.n_ubatch
            return [(a, min(a + n, end)) for a in range(start, end, n)]
        bs = self.segment
        cuts = sorted({start, end, *range((start // bs + 1) * bs, end, bs)})
        return list(zip(cuts[:-1], cuts[1:]))

    def _calls(self, g: _Group, rows: list[_Row]):
        """Group (row, segments, temporaries) into decode calls of at most n_ubatch tokens, each row
        giving at most `self.chain` segments per call (see _probe), every segment after a row's first
        in the call costing one temporary sequence id. A row's segments stay in order; when a row
        spans calls, its later segments see the earlier ones through its base sequence."""
        pending = [(r, list(r.segments)) for r in rows]
        per_row = self.chain if self.segment is not None else 1 << 30
        while pending:
            call, tokens, rest = [], 0, []
            for r, segs in pending:
                take, temps = [], []
                used = {r.base % CLASSES}
                for a, b in segs[:per_row]:
                    if tokens + (b - a) > self.n_ubatch:
                        break
                    if take and self.segment is not None:
                        t = g.take(used)  # the previous segment's own sequence
                        if t is None:
                            break
                        temps.append(t)
                        used.add(t % CLASSES)
                    take.append((a, b))
                    tokens += b - a
                if take:
                    call.append((r, take, temps))
                if len(take) < len(segs):
                    rest.append((r, segs[len(take):]))
            if not call:
                raise RuntimeError("llama.cpp runner: a segment does not fit one decode call")
            yield call
            pending = rest

    def _run(self, g: _Group, call, embd, pos_np, logits, valid) -> None:
        """One decode call. Segment m of a row's n in this call carries the ids {S_m, ..., S_{n-2},
        base}, S_m deciding what it sees: the prefix, segments <= m. Temporaries start as copies of
        the base's prefix and are given back afterwards."""
        sel, seq_ids, out, where, temps = [], [], [], [], []
        for r, segs, chain in call:
            for t in chain:
                g.ctx.seq_cp(r.base, t, 0, segs[0][0])
            temps += chain
            scored = r.outputs
            for m, (a, b) in enumerate(segs):
                own = chain[m:]  # S_m .. S_{n-2}
                ids = [r.base, *own[::-1]] if self.last_decides else [*own, r.base]
                for p in range(a, b):
                    sel.append(r.offset + p - r.start)
                    seq_ids.append(ids)
                    k = scored.get(p)
                    out.append(0 if k is None else 1)
                    if k is not None:
                        where.append((r.index, k))
        n = np.asarray([len(x) for x in seq_ids], dtype=np.int32)
        ids_np = np.zeros((len(sel), int(n.max())), dtype=np.int32)
        for i, x in enumerate(seq_ids):
            ids_np[i, : len(x)] = x
        try:
            got = g.ctx.decode(embd[sel], pos_np[sel], ids_np, n, np.asarray(out, dtype=np.int8))
        finally:
            for t in temps:
                g.give(t)
        self.decode_calls += 1
        if where:
            bi = torch.tensor([w[0] for w in where])
            ai = torch.tensor([w[1] for w in where])
            logits[bi, ai] = torch.from_numpy(got)

    def _probe(self, ctx: LlamaContext) -> None:
        """How many segments of a row one decode call may carry, and in which order a token's ids go.

        llama.cpp documents that a token's first sequence id decides what it sees, but its batch keeps
        a token's ids in an unordered set. With libstdc++, a fresh set of at most CLASSES ints in
        distinct classes mod CLASSES iterates in reverse insertion order (each lands in an empty
        bucket at the list's head), so the id passed last comes first. The probe checks it on this
        build: three tokens at positions 0, 1, 2 with ids {S0, S1, P}, {S1, P}, {P} must give the
        logits of feeding them one at a time into P (token 0 sees itself, token 1 tokens 0-1, ...).
        Chains work: up to CLASSES segments per call. Else two ids ({S, P}, {P}) in either order:
        two segments. Else one segment per row per call (slower, still exact)."""
        self.chain, self.last_decides = 1, True
        if self.segment is None:
            return
        g = torch.Generator().manual_seed(0)
        e = (torch.randn(3, ctx.n_embd, generator=g) * 0.5).numpy()
        pos = np.arange(3, dtype=np.int32)
        one = np.ones(1, dtype=np.int8)
        ctx.clear()
        alone = np.concatenate([ctx.decode(e[i:i + 1], pos[i:i + 1], np.zeros((1, 1), np.int32),
                                           np.ones(1, np.int32), one) for i in range(3)])
        P, S0, S1 = 0, 1, 2  # distinct classes
        for k, last in ((3, True), (3, False), (2, True), (2, False)):
            sets = [[P, S1, S0], [P, S1], [P]] if k == 3 else [[P, S0], [P]]
            if not last:
                sets = [x[::-1] for x in sets]
            ids = np.zeros((k, k), np.int32)
            for i, x in enumerate(sets):
                ids[i, : len(x)] = x
            ctx.clear()
            got = ctx.decode(e[:k], pos[:k], ids, np.array([len(x) for x in sets], np.int32), np.ones(k, np.int8))
            if np.allclose(got, alone[:k], rtol=1e-3, atol=1e-3):
                self.chain, self.last_decides = (CLASSES if k == 3 else 2), last
                break
        ctx.clear()

    def close(self) -> None:
        for g in self.groups:
            g.ctx.close()
