"""A paged KV cache under a token budget.

Keys and values live in one pool per layer, `(pages * page_size, kv_heads, head_dim)`, addressed
through each request's page table, as in vLLM. Page 0 is never handed out: padded rows of a ragged
batch write there, so they can never touch another request's pages.
"""
from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, budget_tokens: int, page_size: int,
                 device, dtype=torch.float32, storage: bool = True):
        """storage False: the pages are only accounted for (a runner that keeps keys and values
        elsewhere, such as llama.cpp's, still has the scheduler budget them); k and v are None."""
        self.page_size = page_size
        self.n_pages = -(-budget_tokens // page_size) + 1
        shape = (n_layers, self.n_pages * page_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype) if storage else None
        self.v = torch.zeros(shape, device=device, dtype=dtype) if storage else None
        self._free = list(range(self.n_pages - 1, 0, -1))  # pop() hands out low page ids first

    @property
    def capacity_tokens(self) -> int:
        return (self.n_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend `table` to cover `tokens` positions; False (and no change) if the pool is short."""
        need = self.pages_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()

    def page_table(self, tables: list[list[int]], rows: int, key_ends: list[int]) -> torch.Tensor:
        """(rows, pages) of the requests' page tables, zero-padded (page 0 is scratch); rows beyond
        len(tables) are padding. Each table must already cover its request's key_end."""
        ps = self.page_size
        out = torch.zeros(rows, max(1, max(len(t) for t in tables)), dtype=torch.long)
        for i, (table, end) in enumerate(zip(tables, key_ends)):
            if end > len(table) * ps:  # the scheduler grows tables first; never clamp silently
                raise RuntimeError(f"page table covers {len(table) * ps} positions, window needs {end}")
            out[i, : len(table)] = torch.as_tensor(table, dtype=torch.long)
        return out

    def slots(self, pages: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Physical pool rows of logical positions (B, N) through page tables (B, pages); invalid
        positions map to row 0 of the scratch page."""
        ps = self.page_size
        rows = pages.gather(1, (positions // ps).clamp(max=pages.shape[1] - 1)) * ps + positions % ps
        return torch.where(valid, rows, 0)


class BatchKV:
    """The view of the cache one ragged forward sees; implements the model's KVCache protocol.

    write: (B, T) pool rows that receive the window's new keys/values (padding -> scratch page 0).
    read: (B, S) pool rows to attend to, in logical position order (padding -> scratch).
    Writes happen before reads, so a window attends to its own fresh keys through the pool.
    """

    def __init__(self, cache: PagedKVCache, write: torch.Tensor, read: torch.Tensor):
        self.cache, self.write, self.read = cache, write.flatten(), read
        self.flat_read = read.flatten()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return write_and_gather(self.cache.k[layer], self.cache.v[layer], self.write, self.read, k, v,
                                self.flat_read)


def write_and_gather(pk: torch.Tensor, pv: torch.Tensor, write: torch.Tensor, read: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, flat_read: torch.Tensor | None = None):
    """Write k/v (B, H, T, D) to one layer's pool rows `write` (B*T,), then gather the rows `read`
    (B, S): keys, values (B, H, S, D). flat_read: read.flatten(), when the caller already has it."""
    B, H, T, D = k.shape
    pk.index_copy_(0, write, k.transpose(1, 2).reshape(B * T, H, D).to(pk.dtype))
    pv.index_copy_(0, write, v.transpose(1, 2).reshape(B * T, H, D).to(pv.dtype))
    # index_select, not pk[read]: the gather of every row's history is the largest cost of a 16-row
    # step after the matmuls, and advanced indexing measured 2-3x slower on CPU.
    S = read.shape[1]
    flat = read.flatten() if flat_read is None else flat_read
    keys = pk.index_select(0, flat).view(B, S, H, D).transpose(1, 2).to(k.dtype)
    values = pv.index_select(0, flat).view(B, S, H, D).transpose(1, 2).to(v.dtype)
    return keys, values
