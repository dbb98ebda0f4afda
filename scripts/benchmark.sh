#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md: trains SPD (with and without the dense prior), its no-PSC ablation and
# the SAM-Tuning baseline on the
# fixed train split of each dataset (frozen-encoder mode, CPU), then runs `spd evaluate` on the test split.
# Usage: bash scripts/benchmark.sh [DATA_ROOT=../shared/data] [OUT=benchmark]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
OUT="${2:-benchmark}"
CACHE="${SPD_EMBED_CACHE:-$HOME/.cache/spdsegment/embeddings}"
SPD=.venv/bin/spd
mkdir -p "$OUT/models"
for ds in hippocampus left_atrium; do
  common=(--data "$DATA/$ds" --dataset "$ds" --cache-dir "$CACHE" --seed 0 --stage1-epochs "${STAGE1_EPOCHS:-8}"
          --stage2-steps "${STAGE2_STEPS:-60}")
  # the four runs share stage 1 (same seed, same data): the work folder resumes it
  $SPD train "${common[@]}" --out "$OUT/models/${ds}_spd.spd.safetensors" --psc-weight 0.5
  cp -r "$OUT/models/${ds}_spd.spd.safetensors.work" "$OUT/models/${ds}_spd_nopsc.spd.safetensors.work"
  $SPD train "${common[@]}" --out "$OUT/models/${ds}_spd_nopsc.spd.safetensors" --psc-weight 0
  cp -r "$OUT/models/${ds}_spd.spd.safetensors.work" "$OUT/models/${ds}_samtune.spd.safetensors.work"
  $SPD train "${common[@]}" --out "$OUT/models/${ds}_samtune.spd.safetensors" --prompt-mode raw --psc-weight 0
  cp -r "$OUT/models/${ds}_spd.spd.safetensors.work" "$OUT/models/${ds}_spd_dense.spd.safetensors.work"
  $SPD train "${common[@]}" --out "$OUT/models/${ds}_spd_dense.spd.safetensors" --psc-weight 0.5 --dense-prior
done
$SPD evaluate --data-root "$DATA" --models-dir "$OUT/models" --out-dir "$OUT" --cache-dir "$CACHE"
