#!/usr/bin/env bash
# Issue 29's rows: decoupled KD, DIST, logit standardization and their compositions with
# attention maps on the strong-teacher benchmark, 3 seeds, at the student's rate and at the other
# point of the two-point grid (CIFAR-100 0.4 and 0.2, CIFAR-10 0.2 and 0.1), paired against the
# student alone and Hinton's KD (`logits`) at the same rate. A finished run is skipped, so this is
# restarted until done:
#
#   nohup nice -n 19 bash benchmarks/logit_methods.sh [STAGE...] > /tmp/logit_methods.log 2>&1 &
#   python benchmarks/strong_teacher.py --report --out benchmarks/results/strong_teacher/cifar100
#
# Stages run in the order given (default: all, cheapest first). Two runs side by side, one thread
# each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
R=benchmarks/results/strong_teacher
run() { python benchmarks/strong_teacher.py --jobs 2 "$@"; }
LOGIT=(student logits dkd dist logits+ls dkd+ls)
# the best map method at a KD step's cost with the best new logit loss: DIST, the best of them
# at its own rate on CIFAR-100 (RESULTS.md section 5); attention+dkd, attention+dkd+ls also exist
COMPOSED=(attention+dist)

logit_methods() {
  run --dataset cifar100 --out $R/cifar100 --lrs 0.4 0.2 --configs "${LOGIT[@]}"
  run --dataset cifar10 --out $R/cifar10 --lrs 0.2 0.1 --configs "${LOGIT[@]}"
  # every method was best at 0.1, the grid's edge, on CIFAR-10: one point lower
  run --dataset cifar10 --out $R/cifar10 --lrs 0.05 --configs "${LOGIT[@]}"
}
composed() {  # attention maps, the best map method at about a KD step, with each logit loss
  run --dataset cifar100 --out $R/cifar100 --lrs 0.4 0.2 --configs "${COMPOSED[@]}"
  run --dataset cifar10 --out $R/cifar10 --lrs 0.2 0.1 --configs "${COMPOSED[@]}"
}
jm_composed() {  # Jacobian matching, the best method per epoch, with DIST (5-6x a KD step)
  run --dataset cifar100 --out $R/cifar100 --lrs 0.4 --configs jacobian_matching+dist
  run --dataset cifar10 --out $R/cifar10 --lrs 0.2 --configs jacobian_matching+dist
}

stages=("${@:-logit_methods composed jm_composed}")
for stage in ${stages[*]}; do
  echo "== $stage $(date -u +%FT%TZ)"
  "$stage"
done
echo "== done $(date -u +%FT%TZ)"
