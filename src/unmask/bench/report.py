"""The benchmark's outputs: a plain-text table, the JSON file and the speed-vs-quality plot."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import configs as C
from .scoring import _index, quality_loss


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def format_table(result: dict) -> str:
    runs, idx = result["runs"], _index(result["runs"])
    head = ["config", "conc", "tok/s", "TPF", "NFE", "TTFT ms", "p50 s", "p99 s", "pass@1", "syntax",
            "line EM", "edit sim", "x ref", "x AR", "dQ ref", "dQ AR", "cpu"]
    rows = []
    for r in runs:
        m, q, x = r["metrics"], r["quality"], r["ratios"]
        c = r["concurrency"]
        ref, ar = idx.get((C.REFERENCE, c)), idx.get((C.ar_baseline(r["config"]), c))
        dq_ref = 0.0 - quality_loss(r, ref)[0] if ref and r is not ref else None  # 0.0 - x: no "-0.0"
        dq_ar = 0.0 - quality_loss(r, ar)[0] if ar and r is not ar else None
        rows.append([
            r["config"] + (" (seq)" if r["sequential"] and c > 1 else ""), str(c), _f(m["tok_s"], ".1f"),
            _f(m["tpf"], ".2f"), _f(m["mean_nfe"], ".1f"),
            _f(None if m["ttft_mean_s"] is None else 1000 * m["ttft_mean_s"], ".0f"),
            _f(m["latency_p50_s"], ".2f"), _f(m["latency_p99_s"], ".2f"),
            _f(100 * q["pass_at_1"], ".1f"), _f(100 * q["syntax_valid"], ".1f"),
            _f(100 * q["line_exact_match"], ".1f"), _f(100 * q["line_edit_similarity"], ".1f"),
            _f(x["speedup_vs_reference"], ".2f"), _f(x["speedup_vs_ar"], ".2f"),
            _f(dq_ref, "+.1f"), _f(dq_ar, "+.1f"), _f(m.get("cpu_share"), ".2f"),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    wl = result["workload"]
    rep = " (repeated to fill the concurrency)" if wl["prompts"] < max(C.CONCURRENCY) else ""
    out = [f"unmask bench: {wl['prompts']} HumanEval prompts{rep} x {wl['length']} tokens per run; "
           f"{wl['lines']} held-out lines (<= {wl['line_tokens']} tokens, at 16 concurrent) per config; "
           f"{result['machine']['cpu_count']} CPUs, {result['machine']['torch_threads']} torch threads", "",
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += ["",
            "(seq): the reference sampler cannot batch; it ran the requests one at a time and its 4/16 rows are",
            "that run, with queueing added to latency and TTFT. x ref / x AR: tok/s ratio against the reference /",
            "AR twin at the same concurrency (the AR twin with the same weights: fp32, int8 or int8wo).",
            "dQ: quality change in points, the worst of line EM, edit similarity, pass@1 and syntax validity",
            "(the last two on the larger HumanEval set below where both sides have it, else on the timed prompts).",
            "pass@1 and syntax columns: on the timed prompts. cpu: CPU share this process got (below ~0.8: other",
            "work competed)."]
    for name, he in result["humaneval"].items():
        out.append(f"HumanEval pass@1 {name}: {100 * he['pass_at_1']:.1f} ({he['n']} problems, {he['max_tokens']} tokens, "
                   f"batch {he['concurrency']}), syntax valid {100 * he['syntax_valid']:.1f}")
    for name, inf in result.get("infill", {}).items():
        out.append(f"single-line infilling {name}: pass@1 {100 * inf['pass_at_1']:.1f}, exact match "
                   f"{100 * inf['exact_match']:.1f} ({inf['n']} lines, one per problem, 16 concurrent)")
    chk = result["checks"]["reference_vs_engine_topk_identical"]
    out.append(f"reference == engine topk-L outputs: {100 * chk['speed_set']:.0f}% of speed prompts, "
               f"{100 * chk['line_set']:.0f}% of lines")
    out.append("")
    for t in result["targets"]:
        mark = "MET" if t["met"] else "NOT MET"
        extra = ""
        if "fastest" in t:
            b, f = t["best"], t["fastest"]
            parts = [f"fastest within {C.MAX_QUALITY_LOSS_POINTS:g} pt: " + (f"{b['config']} x{b['speedup']:.2f}" if b else "none")]
            if f and f is not b and (b is None or f["config"] != b["config"]):
                parts.append(f"fastest: {f['config']} x{f['speedup']:.2f} at -{f['quality_loss_points']:.1f} pt")
            extra = " (" + "; ".join(parts) + ")"
        elif t.get("scaling") is not None:
            extra = f" ({t['config']}: x{t['scaling']:.2f})"
        if not t.get("applies", True):
            extra += f" [measured at length {result['workload']['length']}; defined at {C.TARGET_LENGTH}]"
        if t.get("note") and t.get("applies", True):
            extra += f" [{t['note']}]"
        out.append(f"target {mark:7s} {t['text']}{extra}")
    for sk in result.get("skipped", []):
        out.append(f"skipped {sk['config']}: {sk['reason']}")
    out.append(f"total {result['seconds']:.1f} s")
    return "\n".join(out)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path


def write_plot(result: dict, path: str | os.PathLike) -> Path:
    """Speed (tok/s, log scale) against quality (syntax validity of the timed completions, held-out line
    exact match and edit similarity, and syntax validity on the larger HumanEval set for the configurations
    that have it), per configuration, at batch 1 (filled) and 16 concurrent (hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = {"reference": "tab:red", "dllm": "tab:blue", "ar": "tab:green"}
    n_he = max((he["n"] for he in result.get("humaneval", {}).values()), default=0)
    fig, axes = plt.subplots(1, 4, figsize=(24, 5.2))
    for ax, key, label in ((axes[0], "syntax_valid", "syntax-valid function bodies, timed prompts (%)"),
                           (axes[1], "humaneval_syntax_valid", f"syntax-valid function bodies, {n_he} HumanEval problems (%)"),
                           (axes[2], "line_exact_match", "held-out line exact match (%)"),
                           (axes[3], "line_edit_similarity", "held-out line edit similarity (%)")):
        for r in result["runs"]:
            if r["concurrency"] not in (1, max(C.CONCURRENCY)) or r["quality"].get(key) is None:
                continue
            kind = "reference" if r["config"] == C.REFERENCE else r["system"]
            x, y = max(r["metrics"]["tok_s"], 1e-3), 100 * r["quality"][key]
            filled = r["concurrency"] == 1
            ax.scatter([x], [y], s=55, color=colors[kind], facecolors=colors[kind] if filled else "none", zorder=3)
            if filled:
                ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if ax is axes[0]:
            for kind, col in colors.items():
                ax.scatter([], [], color=col, label={"reference": "reference sampler", "dllm": "dLLM on the engine",
                                                     "ar": "AR twin on the engine"}[kind])
            ax.legend(loc="best", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("aggregate tok/s (log); filled: batch 1, hollow: 16 concurrent")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    m = result["machine"]
    fig.suptitle(f"unmask bench: speed vs quality (length {result['workload']['length']}, "
                 f"{m['cpu_count']} CPUs, torch {m['torch']}, {m['date_utc']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
