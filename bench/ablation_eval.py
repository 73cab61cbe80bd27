r"""Quality and parallelism of several checkpoints on the same workload: HumanEval bodies (164 problems)
and held-out line completion, per decoding policy. Written for the block-size ablation
(configs/gpu/ablate/, scripts/gpu_block_ablation.sh), where it runs on the GPU next to the training
runs; it runs anywhere:

    python3 bench/ablation_eval.py --device cuda --out abl.json /tmp/abl/b4 /tmp/abl/b16 /tmp/abl/b32
    .venv/bin/python bench/ablation_eval.py --device cpu --limit 4 --max-tokens 32 --out /tmp/q.json models/unmask-coder

Per (model, decoding) it reports pass@1, syntax validity, tokens per forward (TPF, the quantity the
block size is meant to raise) and line exact match / edit similarity. tok/s is reported too, but on a
GPU at batch 16 it measures the GPU, not the 2-core CPU the speed targets are set on. The JSON is
rewritten after every row, so a time-boxed run leaves what it finished.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout, uninstalled

import unmask  # noqa: E402
from unmask.eval import evaluate_humaneval, evaluate_lines, load_heldout  # noqa: E402
from unmask.eval.generate import Decoding  # noqa: E402

DECODINGS = [Decoding("threshold-0.9", policy="threshold", threshold=0.9),
             Decoding("threshold-0.7", policy="threshold", threshold=0.7),
             Decoding("threshold-0.5", policy="threshold", threshold=0.5)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoint directories")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--limit", type=int, default=None, help="only the first N HumanEval problems")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--lines", type=int, default=100, help="held-out lines (0: skip)")
    ap.add_argument("--batch", type=int, default=16, help="requests in flight")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip rows that would start after this")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    heldout = Path(__file__).resolve().parent / "heldout_lines.jsonl"
    items = load_heldout(heldout, limit=args.lines) if args.lines else []
    rows: list[dict] = []
    out = Path(args.out)
    t0 = time.perf_counter()
    for path in args.models:
        model = unmask.load(path, device=args.device, dtype=dtype)
        for dec in DECODINGS:
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({"model": path, "decoding": dec.name, "skipped": "budget"})
                continue
            he = evaluate_humaneval(model, dec, limit=args.limit, max_tokens=args.max_tokens, concurrency=args.batch)
            row = {"model": path, "block_size": model.config.block_size, "decoding": dec.name, "n": he["n"],
                   "pass_at_1": he["pass_at_1"], "syntax_valid": he["syntax_valid"],
                   "tpf": he["tokens_per_forward"], "tok_s": he["tokens_per_second"],
                   "completions": [p["completion"] for p in he["problems"]]}
            if items:
                ln, _ = evaluate_lines(model, dec, items=items, concurrency=args.batch)
                row.update(line_exact_match=ln["exact_match"], line_edit_similarity=ln["edit_similarity"])
            rows.append(row)
            print(f"{Path(path).name:>12} {dec.name:>14}: pass@1 {row['pass_at_1']:.3f} syntax {row['syntax_valid']:.3f} "
                  f"TPF {row['tpf']:.2f} tok/s {row['tok_s']:.0f} lines EM {row.get('line_exact_match', 0):.2f} "
                  f"sim {row.get('line_edit_similarity', 0):.3f}", flush=True)
            out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))
        del model
    out.write_text(json.dumps({"device": args.device, "rows": rows, "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
