#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md: trains SPD, its no-PSC ablation and the SAM-Tuning baseline on the
# fixed train split of each dataset (frozen-encoder mode, CPU), then runs `spd evaluate` on the test split
# (which also trains the U-Net baseline and runs the zero-shot SAM baselines and SPD's other ablations).
# Usage: bash scripts/benchmark.sh [DATA_ROOT=../shared/data] [OUT=benchmark]
# Stage-2 steps as in docs/benchmarks.md: 60 for hippocampus, 40 for left atrium (CPU time).
# DENSE=1 also trains the dense-saliency-prompt variant.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
OUT="${2:-benchmark}"
CACHE="${SPD_EMBED_CACHE:-$HOME/.cache/spdsegment/embeddings}"
SPD=.venv/bin/spd
M="$OUT/models"
mkdir -p "$M"
declare -A STEPS=([hippocampus]=60 [left_atrium]=40)
for ds in hippocampus left_atrium; do
  common=(--data "$DATA/$ds" --dataset "$ds" --cache-dir "$CACHE" --seed 0 --stage1-epochs 8
          --stage2-steps "${STEPS[$ds]}")
  $SPD train "${common[@]}" --out "$M/${ds}_spd.spd.safetensors" --psc-weight 0.5
  # the other runs share stage 1 (same seed, same data): a copy of the work folder resumes it
  for variant in spd_nopsc samtune ${DENSE:+spd_dense}; do
    cp -r "$M/${ds}_spd.spd.safetensors.work" "$M/${ds}_${variant}.spd.safetensors.work"
  done
  $SPD train "${common[@]}" --out "$M/${ds}_spd_nopsc.spd.safetensors" --psc-weight 0
  $SPD train "${common[@]}" --out "$M/${ds}_samtune.spd.safetensors" --prompt-mode raw --psc-weight 0
  if [ -n "${DENSE:-}" ]; then
    $SPD train "${common[@]}" --out "$M/${ds}_spd_dense.spd.safetensors" --psc-weight 0.5 --dense-prior
  fi
done
# eager PyTorch fp32, as the tables of docs/benchmarks.md (the bf16 default is checked by scripts/precision_check.py)
$SPD evaluate --data-root "$DATA" --models-dir "$M" --out-dir "$OUT" --cache-dir "$CACHE" --runtime torch --precision fp32
