"""The model runner: turns the windows of many requests into one ragged forward.

Windows are left-padded to a common length; each row's attention mask allows its cached keys, the
decode plan's pattern (`plan.attend`: block-causal, causal or full), and nothing of the padding.
Only the positions a request needs logits for are projected to the vocabulary. With `graphs` set
(Engine(cuda_graphs=True)), decode steps are further padded to static shape buckets and handed to
it (cuda_graphs.py); everything else runs as before.
"""
from __future__ import annotations

import torch

from ..model import Transformer
from ..model.shift import MAX_GAP, left_context
from .cuda_graphs import GraphedForward, StepInputs, run_net
from .kv_cache import PagedKVCache
from ..decode import DecodePlan, Window


def window_left_context(canvas: torch.Tensor, start: int, end: int, mask_id: int, first: int):
    """`left_context(canvas[None, :end])` at positions [start, end), as two (end - start,) tensors.

    When the token just before the window is visible (every decode step of a block model: what lies
    before its block is committed), the scan starts there and runs over the window's few positions in
    Python: the tensor version costs ~100 us of small ops per call whatever the length."""
    if start == 0 or int(canvas[start - 1]) == mask_id:
        prev, gap = left_context(canvas[None, :end], mask_id, first)
        return prev[0, start:], gap[0, start:]
    toks = canvas[start - 1:end].tolist()
    prev, gap = [], []
    last_at, last_tok = 0, toks[0]
    for i in range(1, len(toks)):
        prev.append(last_tok)
        gap.append(min(i - last_at, MAX_GAP))
        if toks[i] != mask_id:
            last_at, last_tok = i, toks[i]
    return torch.tensor(prev, dtype=torch.long), torch.tensor(gap, dtype=torch.long)


class ModelRunner:
    def __init__(self, net: Transformer, cache: PagedKVCache | None, cfg, plan: DecodePlan,
                 graphs: GraphedForward | None = None, pack: bool = True, run=None):
        self.net, self.cache, self.cfg, self.plan, self.graphs = net, cache, cfg, plan, graphs
        # run(net, cache, inputs) -> logits: the eager forward (a tensor-parallel driver sends the
        # inputs to the other ranks first: engine/tensor_parallel.py)
        self.run = run or run_net
        # pack: eager forwards skip the padding in every matmul (Transformer.forward's `packed`).
        # Graphed steps keep their static padded shapes.
        self.pack = pack
        self.device = next(net.parameters()).device

    @torch.inference_mode()
    def forward(self, canvases: list[torch.Tensor], windows: list[Window], tables: list[list[int]],
                scratch: list[int | None] | None = None):
        """Returns logits (B, A, V) for each row's [lo, hi) (left-aligned, padded) and valid (B, A).

        scratch: per row, None or a cache page (or a list of pages) that row's own window writes its
        keys to and reads them from, instead of its request's pages (the window must fit in them). Another row of
        the same request can then write different keys for the same positions in the same forward
        (engine/lookahead.py)."""
        B = len(windows)
        T = max(w.end - w.start for w in windows)
        A = max(w.hi - w.lo for w in windows)
        g = self.graphs
        if g is not None and self.cache is not None and g.accepts(T):
            rows, S = g.buckets(B, max(w.key_end for w in windows))
            T = g.window_bucket(T)
            x, valid = self.build(canvases, windows, tables, rows=rows, T=T, A=T, S=S, pack=False, scratch=scratch)
            return g(x)[:B, :A], valid[:B, :A]
        x, valid = self.build(canvases, windows, tables, scratch=scratch)
        return self.run(self.net, self.cache, x.to(self.device)), valid

    def build(self, canvases: list[torch.Tensor], windows: list[Window], tables: list[list[int]], *,
              rows: int | None = None, T: int | None = None, A: int | None = None, S: int | None = None,
              pack: bool | None = None, scratch: list[int | None] | None = None) -> tuple[StepInputs, torch.Tensor]:
        """The forward's host inputs and valid (rows, A). rows/A/S pad the batch, the logit positions
        the window length and the keys beyond what the windows need (padded rows and positions write to
        scratch page 0 and see key 0)."""
        B = len(windows)
        rows = rows or B
        T = max(T or 0, max(w.end - w.start for w in windows))
        A = A or max(w.hi - w.lo for w in windows)
        ids = torch.zeros(rows, T, dtype=torch.long)
        shift = self.cfg.token_shift
        prev = torch.full((rows, T), self.cfg.pad_token_id, dtype=torch.long)
        gap = torch.ones(rows, T, dtype=torch.long)
        pos = torch.zeros(rows, T, dtype=torch.long)
        qvalid = torch.zeros(rows, T, dtype=torch.bool)
        at = torch.zeros(rows, A, dtype=torch.long)
        avalid = torch.zeros(rows, A, dtype=torch.bool)
        for i, (c, w) in enumerate(zip(canvases, windows)):
            pad = T - (w.end - w.start)
            ids[i, pad:] = c[w.start:w.end]
            if shift:  # the left context a forward of the whole canvas would compute
                prev[i, pad:], gap[i, pad:] = window_left_context(c, w.start, w.end, self.cfg.mask_token_id,
                                                                  self.cfg.pad_token_id)
            pos[i, pad:] = torch.arange(w.start, w.end)
            qvalid[i, pad:] = True
            a = w.hi - w.lo
            at[i, :a] = torch.arange(w.lo, w.hi) - self.plan.logit_shift - w.start + pad
            avalid[i, :a] = True
        write = read = None
        if self.cache is None:
            # Keys are the window itself: every window must start at 0 (no cache to hold a prefix).
            kpos, kvalid = pos, qvalid
        else:
            key_ends = [w.key_end for w in windows]
            S = max(S or 0, max(key_ends))
            kpos = torch.arange(S).expand(rows, S)
            kvalid = kpos < torch.tensor(key_ends + [0] * (rows - B))[:, None]
            pages = self.cache.page_table(tables, rows, key_ends)
            write, read = self.cache.slots(pages, pos, qvalid), self.cache.slots(pages, kpos, kvalid)
            for i, page in enumerate(scratch or []):
                if page is not None:
                    w, ps = windows[i], self.cache.page_size
                    n = w.end - w.start
                    pages = torch.tensor([page] if isinstance(page, int) else list(page))
                    if n > ps * len(pages):
                        raise ValueError(f"a scratch window of {n} positions does not fit {len(pages)} page(s) of {ps}")
                    k = torch.arange(n)
                    write[i, T - n:] = read[i, w.start:w.end] = pages[k // ps] * ps + k % ps
        if self.cache is None and rows == 1 and windows[0].start == 0:
            mask = None  # the model's own pattern: the very call the reference sampler makes
        else:
            mask = self.plan.attend(pos, kpos) & kvalid[:, None, :] & qvalid[:, :, None]
            # A padded query row would see no key at all and produce NaN; let it see key 0 instead.
            mask[:, :, 0] |= ~qvalid
        packed = None
        if (self.pack if pack is None else pack) and not bool(qvalid.all()):
            packed = qvalid.flatten().nonzero().squeeze(1)
        x = StepInputs(ids, pos, prev if shift else None, gap if shift else None, mask, write, read, at, packed)
        return x, avalid
