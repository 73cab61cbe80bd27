"""Self-correction's cost at batch 1: the default decoding with and without remasking, interleaved.

    .venv/bin/python bench/remask_ab.py [--tokens 256] [--rounds 3] [--remask 0.1 0.3] [--json FILE]

Eight HumanEval prompts, one request at a time, 2 threads, greedy. Sides: the default (block
lookahead on), the default without lookahead (what a remask request runs: its verification row takes
lookahead's place), and each --remask threshold. Each round runs every side, then again in reverse
(ABBA), so drift of the shared machine's speed falls on all sides alike; the medians' ratios are the
figures to quote. Prints tok/s, tokens per forward and positions revised per side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--remask", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch

    import unmask
    from unmask.decode import remask as remask_mod
    from unmask.engine import Engine, SamplingParams
    from unmask.eval.generate import split_trailing_whitespace
    from unmask.eval.humaneval import load_problems

    torch.set_num_threads(2)
    model = unmask.load(a.model)
    prompts = [split_trailing_whitespace(p["prompt"])[0] for p in load_problems()[:8]]
    sides = {"default": (True, None), "no lookahead": (False, None),
             **{f"remask {r:g}": (False, r) for r in a.remask}}
    engines = {True: Engine(model, max_batch=1, lookahead=True), False: Engine(model, max_batch=1, lookahead=False)}
    revised = {"n": 0}
    real = remask_mod.judge

    def counting(r, p, logits):
        out = real(r, p, logits)
        revised["n"] += out
        return out

    remask_mod.judge = counting

    def run(name):
        la, rm = sides[name]
        eng = engines[la]
        revised["n"] = 0
        t0 = time.perf_counter()
        outs = [eng.generate([p], SamplingParams(max_tokens=a.tokens, temperature=0, remask=rm))[0] for p in prompts]
        dt = time.perf_counter() - t0
        toks = sum(o.completion_tokens for o in outs)
        return {"tok_s": toks / dt, "tpf": toks / sum(o.nfe for o in outs), "revised": revised["n"],
                "texts": [o.text for o in outs]}

    run("default")  # warm-up
    res = {k: [] for k in sides}
    order = list(sides)
    for _ in range(a.rounds):
        for name in order + order[::-1]:
            res[name].append(run(name))
    base = statistics.median(r["tok_s"] for r in res["default"])
    report = {}
    for name, rs in res.items():
        med = statistics.median(r["tok_s"] for r in rs)
        report[name] = {"tok_s": round(med, 1), "ratio": round(med / base, 3), "tpf": round(rs[0]["tpf"], 3),
                        "revised": rs[0]["revised"], "same_text_as_default": rs[0]["texts"] == res["default"][0]["texts"]}
        print(f"{name:>14}: {med:7.1f} tok/s  x{med / base:.2f}  TPF {rs[0]['tpf']:.2f}  revised {rs[0]['revised']}"
              f"  same text as default: {report[name]['same_text_as_default']}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"tokens": a.tokens, "rounds": a.rounds, "sides": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
