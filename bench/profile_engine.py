"""Where an engine step spends its time, for the dLLM and the AR twin, at batch 1 and 16.

    .venv/bin/python bench/profile_engine.py [--models DIR ...] [--batches 1 16] [--tokens 256]
        [--prompts 8] [--threads 2] [--quantize int8wo] [--ops 15] [--no-profile]

The workload is issue 20's: HumanEval prompts spread over the 164 problems, `--tokens` completion
tokens each, each model's default decoding (its generation_config.json), greedy. For each model and
batch it prints tok/s, TPF and ms per step, then the step split into phases measured with wall
clocks around the very calls the engine makes (frontend, scheduler, plan windows, runner input
building, model forward, policy, commits), then torch.profiler's top operators by self CPU time.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import unmask
from unmask.engine import core as core_mod
from unmask.engine import engine as engine_mod
from unmask.engine import runner as runner_mod

phase: dict[str, float] = defaultdict(float)


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phase[name] += time.perf_counter() - t0
    return wrapper


def instrument():
    engine_mod.Engine.step = timed("whole step", engine_mod.Engine.step)
    core_mod.EngineCore.step = timed("core step", core_mod.EngineCore.step)
    core_mod.EngineCore._apply = timed("commits (plan.apply)", core_mod.EngineCore._apply)
    core_mod.propose_batch = timed("policy: propose", core_mod.propose_batch)
    core_mod.select_commits = timed("policy: select", core_mod.select_commits)
    runner_mod.ModelRunner.build = timed("runner: build inputs", runner_mod.ModelRunner.build)
    runner_mod.run_net = timed("model forward", runner_mod.run_net)
    from unmask.engine.scheduler import Scheduler
    Scheduler.schedule = timed("scheduler", Scheduler.schedule)


def humaneval_prompts(n: int) -> list[str]:
    from unmask.eval import load_problems
    probs = load_problems()
    return [probs[i * len(probs) // n]["prompt"] for i in range(n)]


def run(model, prompts, batch: int, tokens: int, quantize: str | None, ops: int, compile: bool = False):
    engine = unmask.Engine(model, max_batch=max(batch, 1), quantize=quantize, compile=compile)
    params = unmask.SamplingParams(max_tokens=tokens)
    # warm-up (with --compile: every bucket the timed run will use is compiled here)
    engine.generate(prompts[:batch], unmask.SamplingParams(max_tokens=tokens if compile else 16))
    phase.clear()
    steps0 = engine.steps
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i:i + batch], params)
    dt = time.perf_counter() - t0
    steps = engine.steps - steps0
    n = sum(o.completion_tokens for o in outs)
    nfe = sum(o.nfe for o in outs)
    print(f"\n### {model.config.objective}{', ' + quantize if quantize else ''}{', compiled' if compile else ''}, batch {batch}: {n / dt:.1f} tok/s, "
          f"TPF {n / max(nfe, 1):.2f}, {steps} steps in {dt:.2f} s ({1000 * dt / max(steps, 1):.2f} ms/step), "
          f"{n} tokens")
    whole = phase["whole step"]
    rows = [("frontend (detokenise, stops)", whole - phase["core step"]),
            ("scheduler", phase["scheduler"]),
            ("runner: build inputs", phase["runner: build inputs"]),
            ("model forward", phase["model forward"]),
            ("policy: propose", phase["policy: propose"]),
            ("policy: select", phase["policy: select"]),
            ("commits (plan.apply)", phase["commits (plan.apply)"])]
    rows.append(("rest of core step (windows, glue)", phase["core step"] - sum(v for _, v in rows[1:])))
    for k, v in rows:
        print(f"  {k:36s} {1000 * v / max(steps, 1):6.2f} ms/step  {100 * v / whole:5.1f}%")
    print(f"  {'outside the step (generate loop)':36s} {1000 * (dt - whole) / max(steps, 1):6.2f} ms/step")
    if ops:
        engine = unmask.Engine(model, max_batch=max(batch, 1), quantize=quantize)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(prompts[:batch], unmask.SamplingParams(max_tokens=min(tokens, 64)))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops, max_name_column_width=40))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--ops", type=int, default=15, help="operator table rows (0: none)")
    ap.add_argument("--no-profile", action="store_true", help="wall-clock phases only")
    ap.add_argument("--models", nargs="*", default=["models/unmask-coder", "models/unmask-coder-ar"])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--quantize", default=None, help="engine weight quantization (int8wo, bf16, ...)")
    ap.add_argument("--compile", action="store_true", help="Engine(compile=True): compiled CPU decode steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    instrument()
    prompts = humaneval_prompts(a.prompts)
    for path in a.models:
        model = unmask.load(path)
        for batch in a.batches:
            p = (prompts * -(-batch // len(prompts)))[:max(batch, len(prompts))]
            run(model, p, batch, a.tokens, a.quantize, 0 if a.no_profile else a.ops, a.compile)


if __name__ == "__main__":
    main()
