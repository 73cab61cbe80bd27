#!/usr/bin/env bash
# Train the default dLLM and its AR twin side by side on one GPU, in time-boxed legs.
#
# Written for a lease that runs one command of at most 10 minutes at a time and returns at most
# 64 MiB per command, on a machine that has torch but no network. It is a recipe, not part of the
# library: the models themselves come from `unmask train configs/gpu/coder-*.toml`.
#
#   leg1 SECONDS  unpack the corpus and wheels carried in .gpu/ and .whl/, train both models for
#                 SECONDS, checkpoint; put the AR twin's partial (EMA) export in $OUT as a fallback
#   leg2 SECONDS  measure leg 1's throughput, fix max_steps so that the dLLM finishes inside SECONDS,
#                 resume both to that step (the AR twin finishes first); put the dLLM in $OUT
#   leg3          put the AR twin in $OUT
#
# Or, where the lease keeps a machine warm between commands and lets a new process session outlive
# its command (setsid), train straight through with no leg boundary (no recompile, no resume):
#   start SECONDS watch W   unpack, launch both trainers detached with --time-limit SECONDS, then watch
#   watch W                 report progress for up to W seconds or until both trainers have exited
#   ship KIND               put KIND's final export (else its partial one) and the logs in $OUT
#
# Models travel as a tar of the bf16 export cut into 15 MiB pieces: cat them and untar.
# .gpu/ holds train.part*.xz (pieces of corpus/default/train.bin), val.bin.xz, tokenizer.json and
# manifest.json from `unmask data build`.
set -uo pipefail
leg=$1
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/runs}
CONFIGS=${CONFIGS:-configs/gpu}
mkdir -p "$OUT" "$RUNS"
export RUNS
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=8 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor

setup() {
  if ! python3 -c "import pydantic, datasketch" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD/src
  if [ ! -s corpus/default/train.bin ]; then
    mkdir -p corpus/default
    for f in .gpu/train.part*.xz; do xz -dc "$f" > "/tmp/$(basename "${f%.xz}")" & done
    xz -dc .gpu/val.bin.xz > corpus/default/val.bin & wait
    cat /tmp/train.part? > corpus/default/train.bin && rm -f /tmp/train.part?
    cp .gpu/tokenizer.json corpus/default/
    # The carried train split is a prefix of the full one: make the manifest say how long it is.
    python3 - <<'EOF'
import json, os
m = json.load(open(".gpu/manifest.json"))
n = os.path.getsize("corpus/default/train.bin") // 2
m["splits"]["train"].update(tokens=n, bytes=round(m["splits"]["train"]["bytes"] * n / m["splits"]["train"]["tokens"]),
                            sha256=None, note="prefix of the built split, carried to the GPU")
json.dump(m, open("corpus/default/manifest.json", "w"), indent=2)
print("train tokens on this machine:", n)
EOF
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__)"
}

pair() {  # run both trainers with the given extra args; stop both as soon as one fails
  local pids=() k p rc=0
  for k in bd3lm ar; do
    python3 -m unmask.cli train "$CONFIGS/coder-$k.toml" --out "$RUNS/$k" "$@" > "$RUNS/$k.out" 2>&1 &
    pids+=($!)
  done
  (sleep 150; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader > "$RUNS/smi.txt") >/dev/null 2>&1 &
  local smi=$!
  local live=("${pids[@]}")
  while [ ${#live[@]} -gt 0 ]; do
    sleep 2
    local still=()
    for p in "${live[@]}"; do
      if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
      wait "$p"; r=$?
      if [ $r -ne 0 ]; then rc=$r; kill "${pids[@]}" 2>/dev/null; fi
    done
    live=("${still[@]}")
  done
  kill $smi 2>/dev/null
  for k in bd3lm ar; do echo "== $k"; tr "\r" "\n" < "$RUNS/$k.out" | grep -v "^train:" | tail -n 15; tail -n 2 "$RUNS/$k/log.jsonl" 2>/dev/null; done
  return $rc
}

ship() {  # ship DIR NAME: the export as a tar in 15 MiB pieces
  python3 -m unmask.cli convert "$1" "/tmp/$2" --dtype bf16 && tar -C /tmp -cf - "$2" | split -b 15M -d - "$OUT/$2.tar."
}

logs() { tar -C "$RUNS" -czf "$OUT/logs-$leg.tgz" --exclude=checkpoints --exclude=final --exclude=partial . ; }

detach() {  # start both trainers in their own process session so that they outlive this command
  local k
  for k in bd3lm ar; do
    rm -f "$RUNS/$k.rc"
    setsid bash -c "python3 -m unmask.cli train '$CONFIGS/coder-$k.toml' --out '$RUNS/$k' $* > '$RUNS/$k.out' 2>&1 < /dev/null; echo \$? > '$RUNS/$k.rc'" > /dev/null 2>&1 &
  done
  echo "started both trainers at $(date +%T)"
}

watch() {  # watch SECONDS: progress every minute until both trainers wrote their exit code
  local end=$((SECONDS + $1)) k
  while [ $SECONDS -lt $end ]; do
    [ -f "$RUNS/bd3lm.rc" ] && [ -f "$RUNS/ar.rc" ] && break
    sleep 10
    [ $((SECONDS % 60)) -lt 10 ] || continue
    echo "-- $(date +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
    for k in bd3lm ar; do echo "$k: $(tail -n 1 "$RUNS/$k/log.jsonl" 2>/dev/null | cut -c1-220) rc=$(cat "$RUNS/$k.rc" 2>/dev/null)"; done
  done
  for k in bd3lm ar; do echo "== $k rc=$(cat "$RUNS/$k.rc" 2>/dev/null)"; tr "\r" "\n" < "$RUNS/$k.out" | grep -v "^train:" | tail -n 8; done
  logs
}

case $leg in
  start)
    setup
    detach --time-limit "$2"
    [ "${3:-}" = watch ] && watch "$4" ;;
  watch)
    watch "$2" ;;
  ship)
    setup > /dev/null
    logs
    if [ -d "$RUNS/$2/final" ]; then ship "$RUNS/$2/final" "$2-final"; else ship "$RUNS/$2/partial" "$2-partial"; fi ;;
  leg1)
    setup
    pair --time-limit "$2"; rc=$?
    logs
    [ $rc -eq 0 ] && ship "$RUNS/ar/partial" ar-partial
    exit $rc ;;
  leg2)
    setup
    [ -f "$RUNS/bd3lm/checkpoints/latest" ] || { echo "no leg-1 checkpoints on this machine"; exit 3; }
    N=$(python3 - "$2" <<'EOF'
import json, os, statistics, sys
budget, runs = float(sys.argv[1]), os.environ["RUNS"]
rows = {k: [json.loads(l) for l in open(f"{runs}/{k}/log.jsonl")] for k in ("bd3lm", "ar")}
done = {k: int(open(f"{runs}/{k}/checkpoints/latest").read().split("_")[1]) for k in rows}
recent = [r for r in rows["bd3lm"] if "tok_per_s" in r][-10:]
tps = statistics.median(r["tok_per_s"] for r in recent)
steps_per_s = tps / (recent[-1]["tokens"] / recent[-1]["step"])
# compile again (~1 min from the warm cache), then both share the GPU until the twin finishes
n = done["bd3lm"] + int(steps_per_s * (budget - 75))
n = max(n, int(done["ar"] / 0.75) + 1)  # the twin must not have entered the decay yet
print(n, file=sys.stdout)
print(f"leg 1: dLLM {done['bd3lm']} steps, twin {done['ar']} steps, dLLM {tps:.0f} tok/s -> max_steps {n}", file=sys.stderr)
EOF
)
    pair --resume --max-steps "$N" --time-limit "$2"; rc=$?
    logs
    [ -d "$RUNS/bd3lm/final" ] && ship "$RUNS/bd3lm/final" bd3lm-final
    [ -d "$RUNS/bd3lm/final" ] || { [ -d "$RUNS/bd3lm/partial" ] && ship "$RUNS/bd3lm/partial" bd3lm-partial; }
    exit $rc ;;
  leg3)
    setup
    logs
    if [ -d "$RUNS/ar/final" ]; then ship "$RUNS/ar/final" ar-final; else ship "$RUNS/ar/partial" ar-partial; fi ;;
esac
