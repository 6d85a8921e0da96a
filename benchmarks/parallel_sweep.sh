#!/usr/bin/env bash
# Wall time of one 2-job digits sweep run serially (Hydra's basic launcher, torch's default
# threads: one per core), serially with one torch thread (OMP_NUM_THREADS=1), and in parallel
# (hydra/launcher=parallel: joblib, 2 processes, cores // 2 torch threads each), in turn ROUNDS
# times after one untimed sweep that caches the teacher (every timed sweep then loads it).
#   ROUNDS=3 bash benchmarks/parallel_sweep.sh        # needs the sweeps extra
#   ROUNDS=2 EXTRA="limit_train_batches=null limit_val_batches=null" bash benchmarks/parallel_sweep.sh
set -euo pipefail
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-$(mktemp -d /tmp/layerkd-parallel-sweep.XXXX)}
mkdir -p "$OUT"
export LAYERKD_CACHE=$OUT/cache
ARGS=(method=attention,jacobian epochs=4 teacher_epochs=2 limit_train_batches=10
      limit_val_batches=3 trainer.enable_progress_bar=false logger=none)
read -ra EXTRA_ARGS <<< "${EXTRA:-}"   # more overrides, e.g. EXTRA="limit_train_batches=null"
ARGS+=("${EXTRA_ARGS[@]}")
sweep() {  # $1: a name; the rest: extra overrides
    local name=$1; shift
    local start end
    start=$(date +%s.%N)
    python -m lightning_layerkd.app.train -m "${ARGS[@]}" "$@" \
        "hydra.sweep.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
    end=$(date +%s.%N)
    echo "$name $(echo "$end - $start" | bc)"
}
sweep warmup > /dev/null
for round in $(seq "$ROUNDS"); do
    sweep "serial-$round"
    OMP_NUM_THREADS=1 sweep "serial-1thread-$round"
    sweep "parallel-$round" hydra/launcher=parallel
done | tee "$OUT/times.txt"
echo "nproc=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg) out=$OUT"
