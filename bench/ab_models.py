"""Interleaved batch-1 speed of several models or decodings on the same prompts (greedy).

    .venv/bin/python bench/ab_models.py models/unmask-coder runs/distilled \
        runs/coder-rule:learned:0.9 --prompts 8 --tokens 256 --rounds 3

Each ARM is DIR[:POLICY[:THRESHOLD]]. Rounds alternate the arms' order, so drift on a shared machine
falls on every arm alike. Prints tok/s, tokens per forward and seconds per arm; run nothing else meanwhile.
"""
from __future__ import annotations

import argparse
import time

import torch

from unmask.engine import Engine, SamplingParams
from unmask.eval.humaneval import load_problems
from unmask.pretrained import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arms", nargs="+", help="DIR[:POLICY[:THRESHOLD]]")
    ap.add_argument("--prompts", type=int, default=8, help="the first N HumanEval prompts")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = [p["prompt"] for p in load_problems(a.prompts)]
    arms = []
    for spec in a.arms:
        path, policy, thr = (spec.split(":") + [None, None])[:3]
        eng = Engine(load(path), max_batch=1)
        eng.generate(["def f(x):"], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up, untimed
        arms.append((spec, eng, policy, None if thr is None else float(thr)))
    res = {spec: [0, 0, 0.0] for spec, *_ in arms}
    for rnd in range(a.rounds):
        for spec, eng, policy, thr in (arms if rnd % 2 == 0 else arms[::-1]):
            for p in prompts:
                t = time.perf_counter()
                o = eng.generate([p], SamplingParams(max_tokens=a.tokens, temperature=0.0, policy=policy,
                                                     threshold=thr))[0]
                res[spec][2] += time.perf_counter() - t
                res[spec][0] += o.completion_tokens
                res[spec][1] += o.nfe
    base = None
    for spec, (tok, nfe, sec) in res.items():
        rate = tok / sec
        base = base or rate
        print(f"{spec}: {rate:.1f} tok/s (x{rate / base:.2f}), TPF {tok / nfe:.2f}, {sec:.1f} s")


if __name__ == "__main__":
    main()
