"""The model runner: turns the windows of many requests into one ragged forward.

Windows are left-padded to a common length; each row's attention mask allows its cached keys, the
model's own pattern inside its window (block-causal, causal or full), and nothing of the padding.
Only the positions a request needs logits for are projected to the vocabulary.
"""
from __future__ import annotations

import torch

from ..model import Transformer
from ..model.shift import left_context
from .kv_cache import BatchKV, PagedKVCache
from .request import Window


def _allowed(attention: str, block_size: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, T, S) bool: may a query at absolute position q see a key at absolute position k."""
    if attention == "full":
        return torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool)
    if attention == "causal":
        return k[:, None, :] <= q[:, :, None]
    return (k[:, None, :] // block_size) <= (q[:, :, None] // block_size)


class ModelRunner:
    def __init__(self, net: Transformer, cache: PagedKVCache | None, cfg):
        self.net, self.cache, self.cfg = net, cache, cfg
        self.device = next(net.parameters()).device

    @torch.inference_mode()
    def forward(self, canvases: list[torch.Tensor], windows: list[Window], tables: list[list[int]]):
        """Returns logits (B, A, V) for each row's [lo, hi) (left-aligned, padded) and valid (B, A)."""
        B = len(windows)
        T = max(w.end - w.start for w in windows)
        A = max(w.hi - w.lo for w in windows)
        ids = torch.zeros(B, T, dtype=torch.long)
        shift = self.cfg.token_shift
        prev = torch.full((B, T), self.cfg.pad_token_id, dtype=torch.long)
        gap = torch.ones(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        qvalid = torch.zeros(B, T, dtype=torch.bool)
        at = torch.zeros(B, A, dtype=torch.long)
        avalid = torch.zeros(B, A, dtype=torch.bool)
        for i, (c, w) in enumerate(zip(canvases, windows)):
            n, pad = w.end - w.start, T - (w.end - w.start)
            ids[i, pad:] = c[w.start:w.end]
            if shift:  # the left context a forward of the whole canvas would compute
                p, g = left_context(c[None, :w.end], self.cfg.mask_token_id, self.cfg.pad_token_id)
                prev[i, pad:], gap[i, pad:] = p[0, w.start:], g[0, w.start:]
            pos[i, pad:] = torch.arange(w.start, w.end)
            qvalid[i, pad:] = True
            a = w.hi - w.lo
            at[i, :a] = torch.arange(w.lo, w.hi) - w.start + pad
            avalid[i, :a] = True
        if self.cache is None:
            # Keys are the window itself: every window must start at 0 (no cache to hold a prefix).
            kpos, kvalid = pos, qvalid
            kv = None
        else:
            S = max(w.key_end for w in windows)
            kpos = torch.arange(S).expand(B, S)
            kvalid = kpos < torch.tensor([w.key_end for w in windows])[:, None]
            write = torch.zeros(B, T, dtype=torch.long)
            read = torch.zeros(B, S, dtype=torch.long)
            for i, (w, table) in enumerate(zip(windows, tables)):
                pad = T - (w.end - w.start)
                write[i, pad:] = self.cache.slots(table, torch.arange(w.start, w.end))
                read[i, : w.key_end] = self.cache.slots(table, torch.arange(w.key_end))
            kv = BatchKV(self.cache, write.to(self.device), read.to(self.device))
        if kv is None and B == 1 and windows[0].start == 0:
            mask = None  # the model's own pattern: the very call the reference sampler makes
        else:
            mask = _allowed(self.cfg.attention, self.cfg.block_size, pos, kpos) & kvalid[:, None, :] & qvalid[:, :, None]
            # A padded query row would see no key at all and produce NaN; let it see key 0 instead.
            mask[:, :, 0] |= ~qvalid
            mask = mask.to(self.device)
        extra = {"prev_idx": prev.to(self.device), "prev_gap": gap.to(self.device)} if shift else {}
        logits = self.net(ids.to(self.device), positions=pos.to(self.device), attn_mask=mask,
                          kv_cache=kv, logits_at=at.to(self.device), **extra)
        return logits, avalid
