#!/usr/bin/env bash
# The quality numbers of the model cards, for the embedded dLLM and its AR twin:
#   held-out bits per byte (ELBO / exact NLL) on 1024-token windows of the validation packages,
#   HumanEval pass@1 + syntax validity on all 164 problems (greedy, max 256 tokens),
#   single-line infilling pass@1 on HumanEval (one line per problem, 164 items),
#   held-out line completion (100 lines of the validation packages).
# Each writes bench/results/evals/<model>.<eval>.json. Needs corpus/default (unmask data build).
# Speed (tok/s, TPF, NFE at batch 1 and 16 concurrent) comes from `make bench`.
set -euo pipefail
U=${UNMASK:-.venv/bin/unmask}
OUT=${OUT:-bench/results/evals}
DLLM=${DLLM:-models/unmask-coder}
AR=${AR:-models/unmask-coder-ar}
mkdir -p "$OUT"
for m in "$DLLM" "$AR"; do
  n=$(basename "$m")
  "$U" eval bpb --model "$m" --corpus corpus/default --seq-len 1024 --batch 8 --batches 16 --json > "$OUT/$n.bpb.json"
  "$U" eval humaneval --model "$m" --json --out "$OUT/$n.humaneval.jsonl" > "$OUT/$n.humaneval.json"
  "$U" eval infill --model "$m" --lines-per-problem 1 --json --out "$OUT/$n.infill.jsonl" > "$OUT/$n.infill.json"
  "$U" eval lines --model "$m" --json > "$OUT/$n.lines.json"
  cat "$OUT/$n".*.json
done
