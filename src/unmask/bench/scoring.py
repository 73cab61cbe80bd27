"""Ratios of every run against its baselines, and the targets."""
from __future__ import annotations

from . import configs as C

DELTA_KEYS = ("pass_at_1", "syntax_valid", "line_exact_match", "line_edit_similarity", "humaneval_pass_at_1",
              "humaneval_syntax_valid")
FULL_SET = {"pass_at_1": "humaneval_pass_at_1", "syntax_valid": "humaneval_syntax_valid"}


def _index(runs: list[dict]) -> dict:
    return {(r["config"], r["concurrency"]): r for r in runs}


def quality_delta(run: dict, base: dict) -> dict:
    """run - base in points (percentage points) for every quality metric both have."""
    a, b = run["quality"], base["quality"]
    return {k: 100.0 * (a[k] - b[k]) for k in DELTA_KEYS if a.get(k) is not None and b.get(k) is not None}


def quality_loss(run: dict, base: dict) -> tuple[float, dict]:
    """The largest loss (points, >= 0 means worse) over configs.QUALITY_KEYS; pass@1 and syntax validity
    on the larger HumanEval set when both have it on the same problems, else on the timed prompts."""
    d = quality_delta(run, base)
    same_set = run["quality"].get("humaneval_n") == base["quality"].get("humaneval_n")
    used = {}
    for k in C.QUALITY_KEYS:
        full = FULL_SET.get(k)
        if full in d and same_set:
            used[full] = d[full]
        elif k in d:
            used[k] = d[k]
    return max([-v for v in used.values()], default=0.0) + 0.0, used  # + 0.0: no -0.0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def add_ratios(runs: list[dict]) -> None:
    idx = _index(runs)
    for r in runs:
        c, tok_s = r["concurrency"], r["metrics"]["tok_s"]
        ar_name = C.ar_baseline(r["config"])
        ref, ar, one = idx.get((C.REFERENCE, c)), idx.get((ar_name, c)), idx.get((r["config"], 1))
        r["ratios"] = {
            "reference_run": [C.REFERENCE, c] if ref else None,
            "ar_run": [ar_name, c] if ar else None,
            "speedup_vs_reference": _ratio(tok_s, ref["metrics"]["tok_s"]) if ref else None,
            "speedup_vs_ar": _ratio(tok_s, ar["metrics"]["tok_s"]) if ar else None,
            "scaling_vs_batch1": _ratio(tok_s, one["metrics"]["tok_s"]) if one else None,
            "quality_delta_vs_reference": quality_delta(r, ref) if ref else None,
            "quality_delta_vs_ar": quality_delta(r, ar) if ar else None,
        }


def _speed_quality_target(runs: list[dict], base_of, speedup_key: str, need: float) -> dict:
    """base_of(config name) -> the baseline configuration's name."""
    idx = _index(runs)
    rows = []
    for r in runs:
        base = idx.get((base_of(r["config"]), 1))
        if r["concurrency"] != 1 or r["system"] != "dllm" or r["config"] == C.REFERENCE or base is None:
            continue
        loss, used = quality_loss(r, base)
        speed = r["ratios"][speedup_key] or 0.0
        rows.append({"config": r["config"], "baseline": base["config"], "speedup": speed,
                     "quality_loss_points": loss, "compared": used,
                     "ok": speed >= need and loss <= C.MAX_QUALITY_LOSS_POINTS})
    ok = [x for x in rows if x["ok"]]
    kept = [x for x in rows if x["quality_loss_points"] <= C.MAX_QUALITY_LOSS_POINTS]
    fastest = lambda xs: max(xs, key=lambda x: x["speedup"], default=None)  # noqa: E731
    out = {"met": bool(ok), "satisfied_by": [x["config"] for x in ok],
           "best": fastest(kept),  # the fastest configuration that keeps quality (speed may fall short)
           "fastest": fastest(rows),  # the fastest at any quality
           "candidates": rows}
    zero = sorted({x["baseline"] for x in rows if not idx[(x["baseline"], 1)]["quality"]["pass_at_1"]
                   and not idx[(x["baseline"], 1)]["quality"]["line_exact_match"]})
    if zero:
        out["note"] = (f"{', '.join(zero)} {'scores' if len(zero) == 1 else 'score'} 0 on pass@1 and line exact "
                       "match: quality is told apart by edit similarity and syntax validity alone")
    return out


def check_targets(result: dict) -> list[dict]:
    runs = result["runs"]
    length = result["workload"]["length"]
    out = []
    t1 = _speed_quality_target(runs, lambda _: C.REFERENCE, "speedup_vs_reference", C.SPEEDUP_VS_REFERENCE)
    t1["applies"] = length == C.TARGET_LENGTH
    if not t1["applies"]:
        t1["not_applicable"] = f"measured at length {length}; the target is defined at length {C.TARGET_LENGTH}"
    t2 = _speed_quality_target(runs, C.ar_baseline, "speedup_vs_ar", C.SPEEDUP_VS_AR)
    t2["applies"] = True
    main = _index(runs)
    one, many = main.get((C.MAIN, 1)), main.get((C.MAIN, max(C.CONCURRENCY)))
    scale = _ratio(many["metrics"]["tok_s"], one["metrics"]["tok_s"]) if one and many else None
    per_config = {r["config"]: r["ratios"]["scaling_vs_batch1"] for r in runs
                  if r["concurrency"] == max(C.CONCURRENCY) and not r["sequential"]}
    t3 = {"met": scale is not None and scale >= C.BATCH_SCALING, "applies": True, "config": C.MAIN,
          "scaling": scale, "per_config": per_config}
    for target, res in zip(C.TARGETS, (t1, t2, t3)):
        out.append({"key": target.key, "text": target.text, **res})
    return out
