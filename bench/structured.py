r"""Structured outputs: the validity suite (unmask.structured.suite: 50 JSON schemas, 8 regexes, 2
choices, 2 Lark grammars) on each model, and its speed against unconstrained decoding of the same
prompts at the same budget, in interleaved rounds.

    .venv/bin/python bench/structured.py --json bench/results/structured.json \
        models/unmask-coder models/unmask-coder-ar ../shared/fixtures/families/*-tiny

Per model: valid / n (parses, validates against its schema or matches its regex, finished with
"stop"), tokens per forward, tok/s and wall seconds, constrained and not; and whether the
unconstrained requests of a mixed batch (each prompt once with its format, once without) wrote
exactly what they write alone. Run it on a quiet machine: the tok/s columns are timings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout, uninstalled


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (constrained, unconstrained)")
    ap.add_argument("--batch", type=int, default=16, help="requests in flight")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--layout", choices=("prefix", "keys"), default="prefix",
                    help="keys: the suite's schemas of fixed shape only, laid out by their keys, timed against the "
                         "same schemas in the default layout (structured/layout.py)")
    args = ap.parse_args()
    if args.layout == "keys":
        return keys_layout(args)
    import torch

    import unmask
    from unmask.engine import Engine
    from unmask.structured.suite import CASES, run_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    report = []
    for path in args.models:
        model = unmask.load(path)
        eng = Engine(model, max_batch=args.batch)
        run_suite(model, engine=eng, max_tokens=64, selected=CASES[:4])  # warm-up, untimed
        con, unc = [], []
        for _ in range(args.rounds):
            con.append(run_suite(model, engine=eng, max_tokens=args.max_tokens))
            unc.append(run_suite(model, engine=eng, max_tokens=args.max_tokens, constrained=False))
        mixed = run_suite(model, engine=eng, max_tokens=args.max_tokens, mix_unconstrained=True)
        same = mixed["unconstrained"] == [r["text"] for r in unc[0]["rows"]]
        best_c = min(con, key=lambda r: r["seconds"])
        best_u = min(unc, key=lambda r: r["seconds"])
        row = {"model": path, "n": best_c["n"], "valid": best_c["valid"], "valid_every_round": all(
                   r["valid"] == r["n"] for r in con + [mixed]),
               "stop": sum(r["finish_reason"] == "stop" for r in best_c["rows"]),
               "constrained": {k: best_c[k] for k in ("completion_tokens", "nfe", "tokens_per_forward", "seconds",
                                                      "tokens_per_second")},
               "unconstrained": {k: best_u[k] for k in ("completion_tokens", "nfe", "tokens_per_forward", "seconds",
                                                        "tokens_per_second")},
               "unconstrained_unchanged_in_mixed_batch": same,
               "problems": [(r["name"], r["problem"], r["text"][:120]) for r in best_c["rows"] if r["problem"]],
               "outputs": {r["name"]: r["text"] for r in best_c["rows"]}}
        report.append(row)
        c, u = row["constrained"], row["unconstrained"]
        print(f"{Path(path).name:>18}: valid {row['valid']}/{row['n']} (stop {row['stop']}), "
              f"constrained TPF {c['tokens_per_forward']:.2f} {c['tokens_per_second']:.0f} tok/s {c['seconds']:.1f} s "
              f"({c['completion_tokens']} tok) | unconstrained TPF {u['tokens_per_forward']:.2f} "
              f"{u['tokens_per_second']:.0f} tok/s {u['seconds']:.1f} s ({u['completion_tokens']} tok) | "
              f"neighbours unchanged: {same}", flush=True)
        for p in row["problems"]:
            print("   ", p)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"max_tokens": args.max_tokens, "batch": args.batch,
                                               "rows": report}, indent=1))
    return 0


def keys_layout(args) -> int:
    """The fixed-shape schemas of the suite, laid out by their keys against the default layout and
    against no format, interleaved rounds. Both layouts write the same compact JSON, so they are compared
    on forwards and seconds per output, and on the output's own tokens (re-encoded) per second."""
    import torch

    import unmask
    from unmask.engine import Engine
    from unmask.structured.layout import fixed_shape
    from unmask.structured.suite import CASES, run_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    sel = [c for c in CASES if c.schema is not None and fixed_shape(c.schema)]
    report = []
    for path in args.models:
        model = unmask.load(path)
        tok = model.tokenizer
        eng = Engine(model, max_batch=args.batch)
        run_suite(model, engine=eng, max_tokens=64, selected=sel[:4], layout="keys")  # warm-up, untimed
        runs = {"prefix": [], "keys": [], "none": []}
        for _ in range(args.rounds):
            for name in ("prefix", "keys", "none"):
                runs[name].append(run_suite(model, engine=eng, max_tokens=args.max_tokens, selected=sel,
                                            layout=name if name != "none" else "prefix", constrained=name != "none"))
        row = {"model": path, "n": len(sel)}
        for name, rs in runs.items():
            best = min(rs, key=lambda r: r["seconds"])
            out_tokens = sum(len(tok.encode(r["text"], allow_special=False)) for r in best["rows"])
            row[name] = {"valid": best["valid"] if name != "none" else None, "nfe": best["nfe"],
                         "seconds": round(best["seconds"], 3), "output_tokens": out_tokens,
                         "output_tokens_per_forward": round(out_tokens / max(best["nfe"], 1), 3),
                         "output_tokens_per_second": round(out_tokens / best["seconds"], 1)}
        report.append(row)
        print(f"{Path(path).name:>18}: " + " | ".join(
            f"{k}: valid {v['valid']} nfe {v['nfe']} {v['seconds']:.1f} s, {v['output_tokens_per_forward']:.2f} "
            f"out-tok/forward, {v['output_tokens_per_second']:.0f} out-tok/s" for k, v in row.items()
            if isinstance(v, dict)), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"max_tokens": args.max_tokens, "batch": args.batch, "layout": "keys",
                                               "rows": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
