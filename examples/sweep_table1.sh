#!/usr/bin/env bash
# The paper's Table 1 grid (methods, plus the two seed methods, x learning-rate schedules) on the embedded digits data, three
# seeds per cell, then the Table 1 layout and Figure 2-style curves (45 runs; the default digits run
# takes about 15 s for attention on 2 CPU cores; the teacher is trained once per seed and cached).
set -euo pipefail
sweep_dir=${1:-multirun/digits_table1}
layerkd-train -m \
  method=attention,jacobian,hessian,jacobian_matching,information_flow \
  schedule=none,multistep,layerwise \
  seed=0,1,2 \
  logger=wandb \
  hydra.sweep.dir="$sweep_dir"
layerkd-report "$sweep_dir"
