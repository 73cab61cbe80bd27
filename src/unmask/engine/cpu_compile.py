"""Compiled CPU decode steps: the engine's static shape buckets through torch.compile (Inductor).

A CPU decode step of a small model spends about half its time outside the matmuls: some twenty small
ops per layer (norms, RoPE, SwiGLU, residuals, the cache), each a few to fifty microseconds of eager
dispatch. Inductor fuses them into a few C++ loops, and with `freezing` packs each weight once for
oneDNN. It needs shapes it can specialise on, which is what the CUDA-graph path already provides
(cuda_graphs.py): decode steps padded to a bucket of rows B (a power of two) and window length T.
The key length S is the one shape left dynamic: the paged cache's write and gather run as one custom
op (`unmask::paged_kv`, opaque to Inductor, mutating the pool in place), so S only reaches the
attention call and one graph per (B, T) serves every context length.

Prefills (long, variable windows) stay eager. A bucket compiles the first time a step of its shape
runs (seconds; Inductor's on-disk cache makes a second process faster). Tokens equal the eager
engine's at temperature 0 up to fp32 rounding (fused kernels sum in another order, as a batched
matmul already does).
"""
from __future__ import annotations

import torch
import torch._dynamo
from torch.library import custom_op

from .cuda_graphs import GraphedForward, StepInputs
from .kv_cache import PagedKVCache, write_and_gather


@custom_op("unmask::paged_kv", mutates_args=("pool_k", "pool_v"))
def paged_kv(pool_k: torch.Tensor, pool_v: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             write: torch.Tensor, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchKV.update as one op (kv_cache.write_and_gather on layer `layer`); its outputs are
    contiguous, as a custom op's outputs may not be views."""
    keys, values = write_and_gather(pool_k[layer], pool_v[layer], write, read, k, v)
    return keys.contiguous(), values.contiguous()


@paged_kv.register_fake
def _(pool_k, pool_v, layer, k, v, write, read):
    B, H, _, D = k.shape
    S = read.shape[1]
    return k.new_empty(B, H, S, D), v.new_empty(B, H, S, D)


class OpKV:
    """BatchKV's view of the cache with the update as the custom op (what a compiled step traces).
    write: (B*T,) pool rows, already flat; read: (B, S)."""

    def __init__(self, cache: PagedKVCache, write: torch.Tensor, read: torch.Tensor):
        self.cache, self.write, self.read = cache, write, read

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return torch.ops.unmask.paged_kv(self.cache.k, self.cache.v, layer, k, v, self.write, self.read)


def _step(net, cache: PagedKVCache, ids, pos, prev, gap, mask, write, read, at):
    kv = OpKV(cache, write, read)
    return net(ids, positions=pos, attn_mask=mask, kv_cache=kv, logits_at=at, prev_idx=prev, prev_gap=gap)


class CompiledForward(GraphedForward):
    """GraphedForward's buckets, run through one torch.compile'd step per (B, T) bucket instead of
    CUDA graphs. `net` is the model's own network (plain nn.Linear: Inductor packs the weights);
    eager steps outside the buckets keep the engine's own net. Counters: compiled (buckets built),
    replays (steps run compiled)."""

    def __init__(self, net, cache: PagedKVCache, cfg, max_batch: int, limit: int, key_multiple: int = 16):
        super().__init__(net, cache, cfg, max_batch, limit, capture=False, key_multiple=key_multiple)
        self.fns: dict[tuple[int, int], object] = {}
        self.compiled = 0

    def window_bucket(self, T: int) -> int:
        """Windows padded to the next power of two (at most `limit`): a block model's steps (its
        block, two at a block start, plus a shifted family's extra position) take a few buckets."""
        return min(1 << (T - 1).bit_length(), max(self.limit, T))

    def __call__(self, x: StepInputs) -> torch.Tensor:
        B, T = x.ids.shape
        fn = self.fns.get((B, T))
        if fn is None:
            # One compiled callable per bucket, each with static B and T; only S is symbolic.
            fn = self.fns[B, T] = torch.compile(_step, dynamic=None, options={"freezing": True})
            self.compiled += 1
        torch._dynamo.mark_dynamic(x.read, 1)
        torch._dynamo.mark_dynamic(x.mask, 2)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=256,
                                        accumulated_cache_size_limit=1024):
            out = fn(self.net, self.cache, x.ids, x.pos, x.prev, x.gap, x.mask, x.write.flatten(), x.read, x.at)
        self.replays += 1
        return out
