#!/usr/bin/env bash
# Run every experiment, in priority order, until all cells are done; resumable (finished cells are
# skipped). Start it twice to use two workers: each takes the next cell the other does not hold.
# Usage: experiments/run_all.sh [I/N]   (optional shard, to split cells between machines)
set -u
cd "$(dirname "$0")/.."
shard=${1:-0/1}
files=(experiments/cifar10_small.toml experiments/bottleneck.toml experiments/best_practices.toml
       experiments/mnist_mlp.toml experiments/cifar10_full.toml
       experiments/cifar10_init_ablation.toml experiments/cifar10_hybrid_ablation.toml
       experiments/cifar100.toml experiments/cifar10_no_augment.toml)
for pass in 1 2; do  # a second pass picks up cells whose search another worker finished
  for f in "${files[@]}"; do
    .venv/bin/dfatorch experiment "$f" --shard "$shard" --no-progress || echo "failed: $f"
  done
done
