#!/usr/bin/env bash
# The tracking results in docs/RESULTS.md. Resumable: rerun to continue.
# 1. Pre-train the tracker's conv backbone (track_cnn) on CIFAR-10 with this library (BP).
# 2. Compare the online update rules (BP, DFA, BDFA) on every OTB sequence in ../shared, 3 seeds
#    (fc4 starts from the backbone's pre-trained classifier layer: the default).
set -eu
cd "$(dirname "$0")/.."
backbone=runs/backbone-track_cnn
record=experiments/results/tracking/backbone
if [ -f "$backbone/checkpoint.pt" ]; then
  .venv/bin/dfatorch train --resume "$backbone" --no-progress
else
  .venv/bin/dfatorch train --dataset cifar10 --model track_cnn --method bp --epochs 6 \
    --batch-size 128 --optimizer adam --lr 2e-3 --schedule cosine --out "$backbone" --no-progress
fi
mkdir -p "$record" && cp "$backbone/config.json" "$backbone/metrics.jsonl" "$record/"
.venv/bin/dfatorch track-eval ../shared/datasets/otb --update bp,dfa,bdfa --seeds 0,1,2 \
  --backbone "$backbone/checkpoint.pt" --out experiments/results/tracking --no-progress
# 3. Ablation: fc4 from scratch instead of from the backbone's pre-trained classifier layer (the
#    RoI layout that layer needs, 8x8 bins max-pooled to 4x4, replaced by 3x3 bins).
.venv/bin/dfatorch track-eval ../shared/datasets/otb --update bp,dfa,bdfa --seeds 0,1,2 \
  --backbone "$backbone/checkpoint.pt" --out experiments/results/tracking-fc4-scratch \
  --tracker-option fc4_from_backbone=false --tracker-option roi_size=3 \
  --tracker-option roi_sampling=2 --tracker-option roi_max_pool=1 --no-progress
