"""What a linear layer costs at the few rows an engine step carries, on this CPU.

    .venv/bin/python bench/matmul_rows.py [--threads 2]

A dLLM step at batch 1 multiplies 4-8 rows (its block, plus the finished block at a block start)
by every weight matrix; an AR step multiplies one. If the BLAS were bound by reading the weights,
both would cost about the same. The table says how far this machine is from that, for the shapes
of the default models (d_model 512, SwiGLU 1408, vocabulary 8192), with torch's own F.linear and
with a oneDNN linear whose weights are packed once up front (torch.utils.mkldnn).
Best of 3 repeats of 400 calls each.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils import mkldnn

SHAPES = [("qkv", 512, 1536), ("gate+up", 512, 2816), ("down", 1408, 512), ("lm head", 512, 8192)]


def best_us(fn, n: int = 400, repeats: int = 3) -> float:
    for _ in range(30):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 4, 8])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{'layer':8} {'in':>5} {'out':>5} {'rows':>4} {'F.linear us':>12} {'x rows 1':>9} {'oneDNN packed us':>17}")
    for name, k, n in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False)
        packed = mkldnn.to_mkldnn(torch.nn.Sequential(lin))[0]
        w = lin.weight.detach()
        one = None
        for m in a.rows:
            x = torch.randn(m, k)
            t = best_us(lambda: F.linear(x, w))
            one = one or t
            tp = best_us(lambda: packed(x.to_mkldnn()).to_dense())
            print(f"{name:8} {k:5} {n:5} {m:4} {t:12.1f} {t / one:9.2f} {tp:17.1f}", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
