"""What a linear layer costs at the few rows an engine step carries, on this CPU.

    .venv/bin/python bench/matmul_rows.py [--threads 2]
    .venv/bin/python bench/matmul_rows.py --model [models/unmask-coder]

A dLLM step at batch 1 multiplies 4-8 rows (its block, plus the finished block at a block start)
by every weight matrix; an AR step multiplies one. If the BLAS were bound by reading the weights,
both would cost about the same. The table says how far this machine is from that, for the shapes
of the default models (d_model 512, SwiGLU 1408, vocabulary 8192), with torch's own F.linear and
with a oneDNN linear whose weights are packed once up front (torch.utils.mkldnn).
Best of 3 repeats of 400 calls each.

--model: every linear layer of a saved model, called in turn as one forward pass calls them, so the
weights come from memory and not from cache (one layer alone fits in L2/L3 and flatters the
kernel), ms per pass at each row count: fp32 `F.linear` (torch's `x @ W.T`), the engine's fp32
CPU layer (oneDNN-packed weights, or `(W @ x.T).T` with padded rows at 2-4 rows; engine/cpu_linear.py)
and its int8 weight-only layer
(engine/quantize.py). The three are timed in turn, round after round, and the best round of each
is kept, so a noisy neighbour slows all three alike.
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
    ap.add_argument("--rounds", type=int, default=10, help="--model: rounds of the three layers in turn")
    ap.add_argument("--model", nargs="?", const="models/unmask-coder", default=None,
                    help="time a whole model's linear layers, fp32 against int8 weight-only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        return whole_model(a.model, a.rows, a.rounds)
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


def whole_model(path: str, rows: list[int], rounds: int) -> None:
    import unmask
    from unmask.engine.cpu_linear import CpuLinear, cpu_linears
    from unmask.engine.quantize import Int8WeightOnlyLinear

    net = unmask.load(path).net
    fp = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    kinds = {"F.linear": fp, "engine fp32": [m for m in cpu_linears(net).modules() if isinstance(m, CpuLinear)],
             "int8wo": [Int8WeightOnlyLinear(m) for m in fp]}
    mb = sum(m.weight.numel() for m in fp) * 4 / 1e6
    print(f"{path}: {len(fp)} linear layers, {mb:.1f} MB of fp32 weights; ms per pass, best of {rounds} rounds")
    print(f"{'rows':>4} " + " ".join(f"{k:>11}" for k in kinds) + f" {'F.linear / engine fp32':>23}")
    for m in rows:
        xs = {k: torch.randn(m, k) for k in {layer.in_features for layer in fp}}
        best = dict.fromkeys(kinds, float("inf"))
        for _ in range(rounds):
            for name, layers in kinds.items():
                t = time.perf_counter()
                for layer in layers:
                    layer(xs[layer.in_features])
                best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
        print(f"{m:4} " + " ".join(f"{best[k]:11.2f}" for k in kinds)
              + f" {best['F.linear'] / best['engine fp32']:23.2f}", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
