#!/usr/bin/env bash
# The paper's Table 1 grid at CPU scale: methods {attention, jacobian, hessian} x schedules
# {none, multistep, layerwise} plus the student alone, seeds 0-2, then the Table 1 layout and the
# Figure 2-style curves through layerkd-report. Every setting is an ordinary layerkd-train override;
# the scales used for benchmarks/RESULTS.md are the presets below.
#
#   benchmarks/accuracy_grid.sh digits   [SWEEP_DIR]
#   benchmarks/accuracy_grid.sh cifar10  [SWEEP_DIR]   # needs /tmp/cifar10 (an arrays folder, docs/design.md section 7)
#   benchmarks/accuracy_grid.sh cifar100 [SWEEP_DIR]   # needs /tmp/cifar100
#
# Extra layerkd-train overrides go in LAYERKD_GRID_EXTRA (space-separated); CIFAR_ROOT moves the
# unpacked data (default /tmp). Seeds are the outermost sweep dimension, so a sweep cut short
# still holds whole seeds.
set -euo pipefail
dataset=${1:?usage: accuracy_grid.sh digits|cifar10|cifar100 [SWEEP_DIR]}
# a fresh directory per call: layerkd-report refuses a directory that mixes two sweeps
sweep_dir=${2:-benchmarks/results/grid_${dataset}_$(date +%Y%m%d-%H%M%S)}
cifar_root=${CIFAR_ROOT:-/tmp}
case "$dataset" in
  digits)
    # the app's default job: 1,258 train / 539 val images (8x8), digits CNN, 8 epochs
    scale=()
    ;;
  cifar10)
    # 2,000 train images (200 a class), 1,024 test images for validation, ResNet-18 w16 -> ResNet-10 w8
    scale=(dataset=arrays "dataset.data_dir=$cifar_root/cifar10" dataset.subset=200 dataset.batch_size=64
      model=narrow_resnet18_resnet10 epochs=6 teacher_epochs=10 "milestones=[3,5]" every_n_epochs=2
      limit_val_batches=16)
    ;;
  cifar100)
    # 2,000 train images (20 a class), 1,024 test images for validation, same networks
    scale=(dataset=arrays "dataset.data_dir=$cifar_root/cifar100" dataset.subset=20 dataset.batch_size=64
      model=narrow_resnet18_resnet10 epochs=6 teacher_epochs=10 "milestones=[3,5]" every_n_epochs=2
      limit_val_batches=16)
    ;;
  *)
    echo "unknown dataset '$dataset': choose digits, cifar10 or cifar100" >&2
    exit 2
    ;;
esac
# shellcheck disable=SC2206
extra=(${LAYERKD_GRID_EXTRA:-})
common=(logger=csv trainer.enable_progress_bar=false "${scale[@]}" "${extra[@]}")
layerkd-train -m seed=0,1,2 method=attention,jacobian,hessian schedule=none,multistep,layerwise \
  "${common[@]}" hydra.sweep.dir="$sweep_dir/distilled"
layerkd-train -m seed=0,1,2 method=none schedule=multistep \
  "${common[@]}" hydra.sweep.dir="$sweep_dir/student"
layerkd-report "$sweep_dir"
