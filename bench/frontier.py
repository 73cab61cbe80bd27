r"""The speed-quality frontier: every quality row of the model cards against tokens per forward, for
several models and decodings, as JSON and a PNG.

    .venv/bin/python bench/frontier.py --out bench/results/frontier.json \
        models/unmask-coder:threshold:0.9 models/unmask-coder:threshold:0.7 models/unmask-coder:threshold:0.5 \
        models/unmask-coder-ar
    .venv/bin/python bench/frontier.py --out bench/results/frontier.json --plot bench/results/frontier.png

An arm is `DIR[:POLICY[:THRESHOLD[:FALLBACK[:REMASK]]]]` (REMASK: the self-correction threshold; POLICY `topk1` = one token per forward, the most
confident; `leftmost` = one per forward, left to right). Per arm: HumanEval (164 problems, greedy, 256
tokens) pass@1 and syntax validity, single-line infill on all 1033 lines of the canonical solutions,
held-out line completion (100 lines), each with its tokens per forward (a count, so the curve does
not depend on how busy the machine is). Rows are appended to --out as they finish and an arm already
there is skipped, so a long sweep can be stopped and continued. tok/s is recorded but not plotted:
measure speed with bench/ab_models.py on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout, uninstalled

EVALS = ("humaneval", "infill", "lines")


def decoding_of(arm: str):
    from unmask.eval.generate import Decoding

    path, *rest = arm.split(":")
    policy = rest[0] if rest else None
    if policy == "topk1":
        return path, Decoding(arm, policy="topk", steps_ratio=1.0)
    if policy == "leftmost":  # no position reaches 1.01: the fallback commits the leftmost, one per step
        return path, Decoding(arm, policy="threshold", threshold=1.0, fallback="leftmost")
    threshold = float(rest[1]) if len(rest) > 1 and rest[1] else None
    fallback = rest[2] if len(rest) > 2 and rest[2] else None
    remask = float(rest[3]) if len(rest) > 3 else None
    return path, Decoding(arm, policy=policy, threshold=threshold, fallback=fallback, remask=remask)


def run_arm(arm: str, evals, batch: int) -> dict:
    import unmask
    from unmask.eval import evaluate_humaneval, evaluate_lines
    from unmask.eval.humaneval import evaluate_infill

    path, dec = decoding_of(arm)
    model = unmask.load(path)
    row = {"arm": arm, "model": path, "name": Path(path).name, "decoding": dec.describe(),
           "autoregressive": getattr(model.config, "attention", None) == "causal"}
    t0 = time.perf_counter()
    if "humaneval" in evals:
        he = evaluate_humaneval(model, dec, max_tokens=256, concurrency=batch)
        row.update(he_pass=he["pass_at_1"], he_syntax=he["syntax_valid"], he_tpf=he["tokens_per_forward"],
                   he_tok_s=he["tokens_per_second"])
    if "infill" in evals:
        inf = evaluate_infill(model, dec, concurrency=batch)
        row.update(infill_pass=inf["pass_at_1"], infill_n=inf["n"], infill_em=inf["exact_match"],
                   infill_tpf=inf["tokens_per_forward"], infill_passed=[c["passed"] for c in inf["cases"]])
    if "lines" in evals:
        ln, b = evaluate_lines(model, dec, concurrency=batch)
        nfe = sum(c.nfe for c in b.completions)
        row.update(lines_em=ln["exact_match"], lines_sim=ln["edit_similarity"],
                   lines_tpf=sum(c.completion_tokens for c in b.completions) / nfe if nfe else 0.0)
    row["seconds"] = time.perf_counter() - t0
    return row


def plot(rows: list[dict], png: Path, recorded: list[dict] = ()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("he_tpf", "he_pass", "HumanEval pass@1 (164)"), ("he_tpf", "he_syntax", "HumanEval syntax-valid"),
              ("infill_tpf", "infill_pass", "single-line infill pass@1 (1033)"),
              ("lines_tpf", "lines_sim", "held-out lines edit similarity")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["name"], []).append(r)
    for ax, (xk, yk, title) in zip(axes, panels):
        for name, rs in by_model.items():
            rs = sorted((r for r in rs if xk in r and yk in r), key=lambda r: r[xk])
            if not rs:
                continue
            if len(rs) == 1 and rs[0].get("autoregressive"):
                ax.axhline(rs[0][yk], ls="--", color="grey", label=f"{name} (AR, TPF 1)")
                continue
            ax.plot([r[xk] for r in rs], [r[yk] for r in rs], "o-", label=name)
            for r in rs:
                ax.annotate(r["arm"].split(":", 1)[1] if ":" in r["arm"] else "default", (r[xk], r[yk]),
                            fontsize=7, textcoords="offset points", xytext=(3, 3))
        for r in recorded:  # earlier measurements (bench/frontier_recorded.json): hollow markers
            if xk in r and yk in r:
                ax.plot([r[xk]], [r[yk]], "o", mfc="none", label=r["name"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens per forward (16 in flight)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arms", nargs="*", help="DIR[:POLICY[:THRESHOLD[:FALLBACK[:REMASK]]]]")
    ap.add_argument("--out", required=True, help="JSON of rows (appended to; arms already there are skipped)")
    ap.add_argument("--evals", default=",".join(EVALS), help="comma-separated subset of humaneval,infill,lines")
    ap.add_argument("--batch", type=int, default=16, help="requests in flight")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", default=None, help="write the frontier PNG here")
    ap.add_argument("--recorded", default=None, help="JSON of earlier rows to plot beside (bench/frontier_recorded.json)")
    args = ap.parse_args()
    evals = [e for e in args.evals.split(",") if e]
    if bad := set(evals) - set(EVALS):
        ap.error(f"--evals: unknown {', '.join(sorted(bad))}; choose from {', '.join(EVALS)}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {r["arm"] for r in rows}
    for arm in args.arms:
        if arm in done:
            print(f"{arm}: already in {out}, skipped", flush=True)
            continue
        row = run_arm(arm, evals, args.batch)
        rows.append(row)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows}, indent=1))
        tmp.replace(out)
        show = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
        print(f"{arm}: {show}", flush=True)
    if args.plot:
        extra = json.loads(Path(args.recorded).read_text())["rows"] if args.recorded else []
        plot(rows, Path(args.plot), extra)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
