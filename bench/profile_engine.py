"""Where an engine step spends its time, at batch 1 and 16, for the dLLM and the AR twin.

    .venv/bin/python bench/profile_engine.py [--threads 2] [--tokens 128] [--rows 12] [--batches 1 16]
                                             [--quantize int8wo] [--no-profile] [--torch-linear | --no-pack]

For each model and batch it prints: tok/s and TPF, then the step split into phases (runner
input building, model forward, policy, per-request bookkeeping), measured with wall clocks around
the same calls `Engine.step` makes, then torch.profiler's top operators by self CPU time.
--torch-linear: fp32 linears through torch's F.linear instead of the engine's CPU order
(engine/cpu_linear.py), for an A/B on the same machine. --no-pack: the engine's CPU linears without
their oneDNN-packed weights (`(W @ x.T).T` at every row count up to 256).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import unmask
from unmask.engine import engine as engine_mod
from unmask.engine import runner as runner_mod

PROMPTS = ["def add(a, b):\n", "import os\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
           "def fib(n):\n", "def is_palindrome(s):\n", "def read_json(path):\n", "def mean(xs):\n",
           "def flatten(xs):\n"] * 2

phase = defaultdict(float)


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phase[name] += time.perf_counter() - t0
    return wrapper


def instrument():
    """Wrap the step's parts in wall clocks; Engine.step itself is timed as the whole."""
    net_forward = unmask.model.Transformer.forward
    unmask.model.Transformer.forward = timed("model forward", net_forward)
    engine_mod.propose_batch = timed("policy (propose)", engine_mod.propose_batch)
    engine_mod.select_commits = timed("policy (select)", engine_mod.select_commits)
    engine_mod.Engine._advance = timed("per-request advance + detokenize", engine_mod.Engine._advance)
    engine_mod.Engine.step = timed("whole step", engine_mod.Engine.step)
    runner_mod.ModelRunner.forward = timed("runner (incl. model forward)", runner_mod.ModelRunner.forward)


def run(model, batch: int, tokens: int, rows: int, diffusion: dict, quantize: str | None, table: bool):
    engine = unmask.Engine(model, max_batch=16, quantize=quantize)
    params = unmask.SamplingParams(max_tokens=tokens, **diffusion)
    engine.generate(PROMPTS[:batch], unmask.SamplingParams(max_tokens=16, **diffusion))  # warm-up
    phase.clear()
    steps0 = engine.steps
    t0 = time.perf_counter()
    outs = engine.generate(PROMPTS[:batch], params)
    dt = time.perf_counter() - t0
    n = sum(o.completion_tokens for o in outs)
    nfe = sum(o.nfe for o in outs)
    print(f"\n### {model.config.objective}{', ' + quantize if quantize else ''}, batch {batch}: {n / dt:.1f} tok/s, TPF {n / max(nfe, 1):.2f}, "
          f"{engine.steps - steps0} steps in {dt:.2f} s ({1000 * dt / max(engine.steps - steps0, 1):.1f} ms/step)")
    whole = phase["whole step"]
    for k in ("runner (incl. model forward)", "model forward", "policy (propose)", "policy (select)",
              "per-request advance + detokenize"):
        print(f"  {k:34s} {phase[k]:7.3f} s  {100 * phase[k] / whole:5.1f}% of step time")
    rest = whole - phase["runner (incl. model forward)"] - phase["policy (propose)"] - phase["policy (select)"] \
        - phase["per-request advance + detokenize"]
    print(f"  {'scheduler + step glue':34s} {rest:7.3f} s  {100 * rest / whole:5.1f}%")
    print(f"  {'runner input building':34s} {phase['runner (incl. model forward)'] - phase['model forward']:7.3f} s")
    if not table:
        return
    engine = unmask.Engine(model, max_batch=16, quantize=quantize)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(PROMPTS[:batch], unmask.SamplingParams(max_tokens=min(tokens, 64), **diffusion))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--models", nargs="*", default=["models/unmask-coder", "models/unmask-coder-ar"])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--quantize", default=None, help="engine weight quantization (int8, int8wo, bf16)")
    ap.add_argument("--no-profile", action="store_true", help="wall-clock phases only, no operator table")
    ap.add_argument("--torch-linear", action="store_true", help="fp32 linears via F.linear (engine/cpu_linear.py off)")
    ap.add_argument("--no-pack", action="store_true", help="the engine's CPU linears without oneDNN-packed weights")
    a = ap.parse_args()
    if a.no_pack:
        engine_mod.cpu_linear.PACK_LIMIT_BYTES = -1
    if a.torch_linear:
        engine_mod.cpu_linear.applies = lambda net: False
    torch.set_num_threads(a.threads)
    instrument()
    for path in a.models:
        model = unmask.load(path)
        diffusion = {} if model.config.attention == "causal" else {"policy": "threshold", "threshold": 0.9}
        for batch in a.batches:
            run(model, batch, a.tokens, a.rows, diffusion, a.quantize, not a.no_profile)


if __name__ == "__main__":
    main()
