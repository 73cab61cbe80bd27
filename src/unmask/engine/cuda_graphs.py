"""Static shape buckets for the engine's decode steps, and CUDA graphs over them.

A decode step of a small model is launch-bound: a few hundred tiny kernels whose CPU-side launch
costs more than their GPU time. A CUDA graph replays them all with one launch, but it is recorded
for fixed shapes and fixed buffer addresses, while the engine's ragged batches change shape every
step (batch size B, window length T, key length S). So decode steps are padded to a few buckets:

  B -> the next of 1, 2, 4, 8, ... (capped at max_batch)
  S -> the next multiple of `key_multiple` (capped at the model's context)
  A (positions that need logits) -> T

and one graph is captured per bucket (B, T, S, A). Padding is exact, not approximate: padded batch
rows and padded query positions write their keys to the cache's scratch page 0 and see only key 0
(so softmax has something to normalise and nothing turns NaN); padded key columns read scratch
row 0 and are masked out; padded logit positions gather position 0 and are sliced off.

Prefill steps (long, variable windows) stay eager: graphing them would mean a graph per prompt
length. On CPU, or with capture off, the same padded inputs run eagerly, which is how the
bucketing is tested without a GPU (it buys nothing there).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..model.inputs import ForwardBatch
from .kv_cache import BatchKV, PagedKVCache


def batch_bucket(n: int, max_batch: int) -> int:
    """The padded batch size for n rows: the next power of two, at most max_batch."""
    if n < 1 or n > max_batch:
        raise ValueError(f"batch of {n} rows does not fit max_batch {max_batch}")
    return min(1 << (n - 1).bit_length(), max_batch)


def key_bucket(s: int, multiple: int, max_seq_len: int) -> int:
    """The padded key length for s keys: the next multiple of `multiple`, at most max_seq_len."""
    if s < 1 or s > max_seq_len:
        raise ValueError(f"{s} keys do not fit the context of {max_seq_len}")
    return min(-(-s // multiple) * multiple, max_seq_len)


@dataclass
class StepInputs:
    """One forward's inputs, on the host; see ModelRunner.build. prev/gap are None unless the model
    uses token_shift; mask/write/read are None without a KV cache."""

    ids: torch.Tensor  # (B, T)
    pos: torch.Tensor  # (B, T)
    prev: torch.Tensor | None  # (B, T)
    gap: torch.Tensor | None  # (B, T)
    mask: torch.Tensor | None  # (B, T, S) bool
    write: torch.Tensor | None  # (B, T) pool rows
    read: torch.Tensor | None  # (B, S) pool rows
    at: torch.Tensor  # (B, A)
    packed: torch.Tensor | None = None  # (N,) real positions of the flattened (B, T); eager steps only

    def to(self, device) -> StepInputs:
        return StepInputs(*(None if t is None else t.to(device) for t in (getattr(self, f.name) for f in fields(self))))

    @property
    def key(self) -> tuple[int, int, int, int]:
        B, T = self.ids.shape
        return B, T, self.read.shape[1], self.at.shape[1]


def run_net(net, cache: PagedKVCache | None, x: StepInputs) -> torch.Tensor:
    kv = None if x.write is None else BatchKV(cache, x.write, x.read)
    batch = ForwardBatch(x.ids, positions=x.pos, attn_mask=x.mask, kv_cache=kv, logits_at=x.at,
                         prev_idx=x.prev, prev_gap=x.gap, packed=x.packed)
    return net(batch.ids, **batch.kwargs())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: StepInputs  # static device buffers the graph reads
    output: torch.Tensor  # static device buffer the graph writes


class GraphedForward:
    """Pads decode steps to buckets and runs them through one CUDA graph per bucket.

    capture: record graphs (default: when the model is on CUDA). Without it, padded inputs run
    eagerly. max_graphs: beyond this many buckets, new ones run eagerly (a graph holds its own
    output buffer, and capturing costs a warm-up forward, so an unbounded set would leak memory
    under odd traffic). Counters: captures, replays, eager (padded steps run without a graph).
    """

    def __init__(self, net, cache: PagedKVCache, cfg, max_batch: int, limit: int, *, capture: bool | None = None,
                 key_multiple: int = 128, max_graphs: int = 96, warmup: int = 2):
        """limit: the longest window that is bucketed (the decode plan's `decode_window`: block
        models feed the active block, plus the just-finished block on a block's first step, so up to
        two blocks; causal models one token; full-attention models 0, since their windows depend on
        per-request block sizes and refreshes, and each distinct length would need its own graph)."""
        self.net, self.cache, self.cfg, self.max_batch = net, cache, cfg, max_batch
        self.device = next(net.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graph capture needs a model on a CUDA device")
        self.key_multiple, self.max_graphs, self.warmup = key_multiple, max_graphs, warmup
        self.limit = limit
        self.graphs: dict[tuple[int, int, int, int], _Graph] = {}
        self.pool = None  # one memory pool for every graph: replays never overlap, so they can share
        self.captures = self.replays = self.eager = 0

    def accepts(self, T: int) -> bool:
        return T <= self.limit

    def window_bucket(self, T: int) -> int:
        """The padded window length of a step whose longest window is T (here: T itself)."""
        return T

    def buckets(self, B: int, S: int) -> tuple[int, int]:
        return batch_bucket(B, self.max_batch), key_bucket(S, self.key_multiple, self.cfg.max_seq_len)

    def __call__(self, x: StepInputs) -> torch.Tensor:
        """Logits (B, A, V) for padded host inputs. On the graph path this is a view of the graph's
        static output: valid until the next call."""
        g = self.graphs.get(x.key) if self.capture else None
        if g is None and self.capture and len(self.graphs) < self.max_graphs:
            g = self.graphs[x.key] = self._capture(x)
        if g is None:
            self.eager += 1
            return run_net(self.net, self.cache, x.to(self.device))
        for f in fields(x):
            src = getattr(x, f.name)
            if src is not None:
                getattr(g.inputs, f.name).copy_(src)
        g.graph.replay()
        self.replays += 1
        return g.output

    def _padding(self, x: StepInputs) -> StepInputs:
        """Device buffers of x's shapes holding an all-padding batch: every row writes and reads
        scratch page 0 and sees key 0 only. Warm-up and capture run on these, never on real rows."""
        B, T, S, A = x.key
        mask = torch.zeros(B, T, S, dtype=torch.bool, device=self.device)
        mask[:, :, 0] = True
        z = torch.zeros(B, T, dtype=torch.long, device=self.device)
        prev = None if x.prev is None else torch.full_like(z, self.cfg.pad_token_id)
        gap = None if x.gap is None else torch.ones_like(z)
        return StepInputs(z.clone(), z.clone(), prev, gap, mask, z.clone(),
                          torch.zeros(B, S, dtype=torch.long, device=self.device),
                          torch.zeros(B, A, dtype=torch.long, device=self.device))

    def _capture(self, x: StepInputs) -> _Graph:
        static = self._padding(x)
        # Warm up on a side stream (as torch.cuda.graph's docs ask): lazy init, cuBLAS handles and
        # autotuning must happen outside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run_net(self.net, self.cache, static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run_net(self.net, self.cache, static)
        self.captures += 1
        return _Graph(graph, static, out)
