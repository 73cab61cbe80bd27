"""`unmask bench`: one process, one run. Speed and quality of every configuration in configs.CONFIGS
at every concurrency in configs.CONCURRENCY, on a fixed workload:

- speed set: `prompts` HumanEval prompts (spread over the 164), `length` completion tokens each, no
  stop strings (every system generates the same budget). Timed at each concurrency; quality on the
  same generations: pass@1 on those problems and syntax validity of prompt + truncated body.
- line set: held-out line completion (bench/heldout_lines.jsonl), stop at newline, at concurrency 16
  per configuration: exact match and edit similarity.
- full HumanEval pass@1 and syntax validity (all 164, 16 in flight) for configs.HUMANEVAL_CONFIGS
  (in --quick: the timed prompts), and single-line infilling (one line of each of `infill_problems`
  solutions) for the same configs. Quality comparisons use these where both sides have them.

The reference sampler cannot batch: it runs once, sequentially, and its 4- and 16-concurrent rows
are that same run with queueing (a request waits for the ones before it) added to its latencies.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

from ..eval.code_quality import mean
from ..eval.generate import Batch, Completion, Task, run_tasks, set_threads, warm_up
from ..eval.humaneval import evaluate_infill, infill_cases, load_problems, score_bodies, spread
from ..eval.line_completion import line_tasks, load_heldout, score_lines
from . import configs as C
from ..engine.quantize import int8_speedup_cpu
from .scoring import add_ratios, check_targets

SCHEMA = "unmask.bench/1"


def speed_metrics(batch: Batch) -> dict:
    comps = batch.completions
    toks = sum(c.completion_tokens for c in comps)
    nfe = sum(c.nfe for c in comps)
    lat = np.array([c.latency for c in comps]) if comps else np.zeros(1)
    ttfts = [c.ttft for c in comps if c.ttft is not None]
    return {
        "requests": len(comps), "completion_tokens": toks, "wall_s": batch.wall_seconds,
        "tok_s": toks / batch.wall_seconds if batch.wall_seconds > 0 else 0.0,
        "tpf": toks / nfe if nfe else 0.0, "mean_nfe": nfe / max(len(comps), 1),
        "ttft_mean_s": mean(ttfts) if ttfts else None,
        "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
        "errors": sum(c.error is not None for c in comps),
        # CPU this process got per second of wall time, over the torch threads: much below 1 means other
        # work was competing for the cores and the timings are pessimistic.
        "cpu_share": batch.extra.get("cpu_seconds", 0.0) / (batch.wall_seconds * torch.get_num_threads())
        if batch.wall_seconds > 0 else None,
    }


def cycle(xs: list, n: int) -> list:
    """xs repeated (in order) to n items, so a run at concurrency c has at least c requests."""
    return [xs[i % len(xs)] for i in range(max(n, len(xs)))]


def queued(batch: Batch, concurrency: int) -> Batch:
    """A sequential run seen by a closed-loop client with `concurrency` requests in flight: the
    server works one at a time, so each request also waits for the ones submitted before it.
    With fewer requests than `concurrency` the measured ones are repeated (as `cycle` does)."""
    done = cycle(batch.completions, concurrency)
    if concurrency == 1:
        return batch
    slots = [0.0] * concurrency  # when each client slot submits next
    free_at, comps = 0.0, []
    for c in done:
        k = min(range(len(slots)), key=slots.__getitem__)
        submit = slots[k]
        start = max(submit, free_at)
        free_at = start + c.latency
        slots[k] = free_at
        wait = start - submit
        comps.append(Completion(c.text, c.completion_tokens, c.nfe, wait + c.latency,
                                None if c.ttft is None else wait + c.ttft, c.finish_reason, c.error))
    scale = len(done) / max(len(batch.completions), 1)  # the measured run, repeated as needed
    extra = {k: v * scale for k, v in batch.extra.items() if k == "cpu_seconds"}
    return Batch(comps, batch.wall_seconds * scale, concurrency, sequential=True, extra=extra)


def machine_info(threads: int) -> dict:
    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": threads,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        from importlib.metadata import version

        info["unmask"] = version("unmask")
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        from ..pretrained import REPO_ROOT

        info["git_commit"] = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def model_info(model) -> dict:
    cfg = model.config
    return {"path": str(model.path) if model.path else None, "attention": cfg.attention, "objective": cfg.objective,
            "block_size": cfg.block_size, "params": sum(p.numel() for p in model.net.parameters()),
            "d_model": cfg.d_model, "n_layers": cfg.n_layers, "max_seq_len": cfg.max_seq_len}


def check_fits(model, tasks, max_tokens: int, what: str) -> None:
    """Refuse up front (UserError) a workload that does not fit the model's context."""
    from ..errors import UserError
    from ..sampling import layout_prompt

    worst = max(sum(map(len, layout_prompt(model, t.prompt, t.suffix))) for t in tasks)
    ctx = model.config.max_seq_len
    if worst + max_tokens > ctx:
        raise UserError(f"{model.path or 'model'}: the longest {what} is {worst} tokens, plus {max_tokens} to "
                        f"generate is more than the model's context of {ctx}; lower --length")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(dllm, ar, wl: C.Workload, *, heldout=None, threads: int | None = None, log=_log) -> dict:
    """Run everything on loaded models (Pretrained); returns the JSON-able result."""
    t_start = time.perf_counter()
    threads = set_threads(threads)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # other work skews timings
    problems = spread(load_problems(), wl.prompts)
    items = spread(load_heldout(heldout), wl.lines)
    speed_tasks = [Task(p["prompt"]) for p in problems]
    models = {"dllm": dllm, "ar": ar}
    infill_problems = spread(load_problems(), wl.infill_problems) if wl.infill_problems else []
    for m in models.values():
        check_fits(m, speed_tasks, wl.length, "speed prompt")
        check_fits(m, line_tasks(items), wl.line_tokens, "held-out line prefix")
        if infill_problems:
            check_fits(m, [Task(c.prefix, c.suffix) for c in infill_cases(infill_problems, 1)], wl.infill_tokens,
                       "infilling prompt")
        if wl.humaneval_limit != 0:
            check_fits(m, [Task(p["prompt"]) for p in load_problems(wl.humaneval_limit)], wl.length, "HumanEval prompt")
    exec_cache: dict = {}
    runs, lines, humaneval, infill, texts = [], {}, {}, {}, {}
    ex = dict(timeout=wl.timeout, workers=wl.workers, cache=exec_cache)

    skipped = []
    slow_int8 = _slow_int8(models.values())
    for system, dec in C.CONFIGS:
        model = models[system]
        if dec.quantize == "int8" and slow_int8:
            skipped.append({"config": dec.name, "reason": slow_int8})
            log(f"[bench] {dec.name:14s} skipped: {slow_int8}")
            continue
        t_cfg = time.perf_counter()
        warm_up(model, dec)
        if dec.sampler == "reference":
            once = run_tasks(model, speed_tasks, dec, max_tokens=wl.length, concurrency=1)
            batches = {c: queued(once, c) for c in C.CONCURRENCY}
        else:
            batches = {c: run_tasks(model, cycle(speed_tasks, c), dec, max_tokens=wl.length, concurrency=c)
                       for c in C.CONCURRENCY}
        base_texts = [x.text for x in batches[1].completions]
        texts[dec.name] = base_texts
        for c, batch in batches.items():
            probs_c = cycle(problems, len(batch.completions))
            q = score_bodies(probs_c, [x.text for x in batch.completions], **ex)
            same = mean(a.text == b for a, b in zip(batch.completions, cycle(base_texts, len(batch.completions))))
            run = {"config": dec.name, "system": system, "concurrency": c, "sequential": batch.sequential,
                   "metrics": speed_metrics(batch),
                   "quality": {"pass_at_1": q["pass_at_1"], "syntax_valid": q["syntax_valid"],
                               "identical_to_batch1": same}}
            if c == 1:
                run["problems"] = [{k: r[k] for k in ("task_id", "passed", "status", "syntax_valid", "completion")}
                                   for r in q["problems"]]
            runs.append(run)
        # held-out lines: one run per configuration, 16 in flight (the reference: sequential)
        lb = run_tasks(model, line_tasks(items), dec, max_tokens=wl.line_tokens, concurrency=max(C.CONCURRENCY),
                       stop=["\n"])
        ls = score_lines(items, [x.text for x in lb.completions])
        texts[dec.name + "/lines"] = [x.text.split("\n", 1)[0] for x in lb.completions]
        lines[dec.name] = {"n": ls["n"], "exact_match": ls["exact_match"], "edit_similarity": ls["edit_similarity"],
                           "concurrency": lb.concurrency, "sequential": lb.sequential, "metrics": speed_metrics(lb)}
        for run in runs:
            if run["config"] == dec.name:
                run["quality"].update(line_exact_match=ls["exact_match"], line_edit_similarity=ls["edit_similarity"])
        if dec.name in C.HUMANEVAL_CONFIGS:
            humaneval[dec.name] = _full_humaneval(model, dec, wl, problems, base_texts, ex)
            if wl.infill_problems:
                inf = evaluate_infill(model, dec, problems=infill_problems, max_lines_per_problem=1,
                                      max_tokens=wl.infill_tokens, concurrency=max(C.CONCURRENCY),
                                      timeout=wl.timeout, workers=wl.workers)
                infill[dec.name] = {k: inf[k] for k in ("n", "pass_at_1", "exact_match", "max_tokens", "seconds",
                                                        "tokens_per_second", "tokens_per_forward")}
        t = runs[-1]["metrics"]
        log(f"[bench] {dec.name:14s} done in {time.perf_counter() - t_cfg:6.1f} s  "
            f"(c=1 {runs[-len(batches)]['metrics']['tok_s']:8.1f} tok/s, c=16 {t['tok_s']:8.1f} tok/s, "
            f"line EM {ls['exact_match']:.3f})")

    for run in runs:
        he = humaneval.get(run["config"])
        run["quality"]["humaneval_pass_at_1"] = he["pass_at_1"] if he else None
        run["quality"]["humaneval_syntax_valid"] = he["syntax_valid"] if he else None
        run["quality"]["humaneval_n"] = he["n"] if he else None
    add_ratios(runs)
    checks = {"reference_vs_engine_topk_identical": {
        "speed_set": mean(a == b for a, b in zip(texts[C.REFERENCE], texts["topk-L"])),
        "line_set": mean(a == b for a, b in zip(texts[C.REFERENCE + "/lines"], texts["topk-L/lines"]))}}
    result = {
        "schema": SCHEMA,
        "machine": machine_info(threads),
        "workload": {**wl.__dict__, "concurrency": list(C.CONCURRENCY), "speed_task_ids": [p["task_id"] for p in problems],
                     "line_items": len(items)},
        "models": {"dllm": model_info(dllm), "ar": model_info(ar)},
        "configs": [{"name": d.name, "system": s, "sampler": d.sampler, "policy": d.policy, "threshold": d.threshold,
                     "fallback": d.fallback, "steps_ratio": d.steps_ratio, "lookahead": d.lookahead,
                     "describe": d.describe()}
                    for s, d in C.CONFIGS],
        "runs": runs, "lines": lines, "humaneval": humaneval, "infill": infill, "checks": checks,
        "skipped": skipped,
    }
    result["targets"] = check_targets(result)
    result["machine"]["load_average_at_start"] = load_at_start
    result["machine"]["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["seconds"] = time.perf_counter() - t_start
    return result


def _slow_int8(models) -> str | None:
    """Why the int8 rows would only measure a slow CPU kernel, or None. On a CPU without int8
    dot-product instructions they run many times slower than fp32 (quantize.int8_speedup_cpu) and
    would take most of the run's time."""
    if any(m.device.type != "cpu" for m in models):
        return None
    x = int8_speedup_cpu()
    if x >= 1.0:
        return None
    return (f"int8 matmul measured {1 / x:.1f}x slower than fp32 on this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}, no int8 dot-product instructions)")


def _full_humaneval(model, dec, wl: C.Workload, speed_problems, speed_texts, ex) -> dict:
    """pass@1 and syntax validity over `humaneval_limit` problems (0: just the timed prompts; N: the first N;
    None: all) at `humaneval_concurrency`; problems of the speed set reuse their batch-1 generations (same
    prompt, same length, greedy, and batch invariant: the speed runs check identical_to_batch1)."""
    problems = list(speed_problems) if wl.humaneval_limit == 0 else load_problems(wl.humaneval_limit)
    have = {p["task_id"]: t for p, t in zip(speed_problems, speed_texts)}
    todo = [p for p in problems if p["task_id"] not in have]
    t0 = time.perf_counter()
    batch = run_tasks(model, [Task(p["prompt"]) for p in todo], dec, max_tokens=wl.length,
                      concurrency=wl.humaneval_concurrency)
    have.update({p["task_id"]: c.text for p, c in zip(todo, batch.completions)})
    res = score_bodies(problems, [have[p["task_id"]] for p in problems], **ex)
    return {"n": res["n"], "pass_at_1": res["pass_at_1"], "syntax_valid": res["syntax_valid"],
            "timeouts": res["timeouts"], "max_tokens": wl.length, "concurrency": wl.humaneval_concurrency,
            "generated": len(todo), "seconds": time.perf_counter() - t0,
            "subset": "timed prompts" if wl.humaneval_limit == 0 else "all" if len(problems) == 164 else "first N",
            "passed": [r["task_id"] for r in res["problems"] if r["passed"]]}
