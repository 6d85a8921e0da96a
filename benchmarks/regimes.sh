#!/usr/bin/env bash
# The regimes grid (RESULTS.md section 3): each method at its own rate, full data, a longer
# budget and compute-matched rows, on the strong-teacher benchmark. Every run is one JSON file and
# a finished run is skipped, so this script is restarted (each session) until the grid is done:
#
#   nohup nice -n 19 bash benchmarks/regimes.sh [STAGE...] > /tmp/regimes.log 2>&1 &
#
# Stages run in the order given (default: all; the jm_ stages are the Jacobian-matching rows,
# compute_matched takes its budget from jm_own_rate's measured runs). Two runs side by side, one
# thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
R=benchmarks/results/strong_teacher
run() { python benchmarks/strong_teacher.py --jobs 2 "$@"; }

own_rate() {  # item 1: the other point of the two-point grid (the student's best rate exists)
  run --dataset cifar100 --out $R/cifar100 --lrs 0.2 \
    --configs student logits attention+logits/constant information_flow
  run --dataset cifar10 --out $R/cifar10 --lrs 0.1 \
    --configs student logits attention+logits/constant information_flow
}
longer() {  # item 3: 45 epochs, an update every 5 (eight updates, like the paper's 200/25)
  run --dataset cifar100 --out $R/cifar100_e45 --epochs 45 --every-n-epochs 5 --lrs 0.4 \
    --configs student logits attention/constant attention/relative-0.5
}
full_data() {  # item 2: all 50,000 CIFAR-100 training images, same epochs and schedule
  run --dataset cifar100 --out $R/cifar100_full --train-images 50000 --lrs 0.4 \
    --configs student logits attention/constant attention/relative-0.5 \
    attention+logits/constant information_flow
}
jm_own_rate() {
  run --dataset cifar100 --out $R/cifar100 --lrs 0.2 --configs jacobian_matching
  run --dataset cifar10 --out $R/cifar10 --lrs 0.1 --configs jacobian_matching
}
jm_longer() {
  run --dataset cifar100 --out $R/cifar100_e45 --epochs 45 --every-n-epochs 5 --lrs 0.4 \
    --configs jacobian_matching hessian-activation/constant hessian-activation/relative-0.5
}
jm_terms() {  # issue 28: which of Jacobian matching's terms carry its gain (the output alone,
  # the output plus one crucial layer); the output plus all four is the jacobian_matching row
  run --dataset cifar100 --out $R/cifar100 --lrs 0.4 --configs jacobian_matching/output \
    jacobian_matching/layer1 jacobian_matching/layer2 jacobian_matching/layer3 \
    jacobian_matching/layer4
}
compute_matched() {  # item 4: the student alone and attention + logit KD trained for as many
  # core-seconds as a Jacobian-matching run (its measured cost: run after jm_own_rate); one
  # student run at 15 epochs first measures the student's cost (older rows have only wall time)
  run --dataset cifar100 --out $R/cifar100_cost --lrs 0.4 --seeds 0 --configs student
  local config epochs
  for config in student attention+logits/constant; do
    epochs=$(python benchmarks/regimes_report.py --matched-epochs "$config")
    run --dataset cifar100 --out $R/cifar100_matched --epochs "$epochs" \
      --every-n-epochs "$epochs" --lrs 0.4 --configs "$config"
  done
}
jm_full_data() {
  run --dataset cifar100 --out $R/cifar100_full --train-images 50000 --lrs 0.4 --seeds 0 1 \
    --configs jacobian_matching
}

stages=("${@:-own_rate jm_own_rate compute_matched longer full_data jm_terms jm_longer jm_full_data}")
for stage in ${stages[*]}; do
  echo "== $stage $(date -u +%FT%TZ)"
  "$stage"
done
echo "== done $(date -u +%FT%TZ)"
