#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md, from scratch: fills the feature store, trains the shipped SPD models,
# their stage-2 variants (same stage 1, resumed from its checkpoint) and the baselines on the fixed train_full
# split of each dataset (CPU, frozen encoder), then runs `spd evaluate` on the test_full split.
# Usage: bash scripts/benchmark.sh [DATA_ROOT=../shared/data] [OUT=benchmark]
# Settings as in docs/benchmarks.md (stage-1 steps capped for CPU time). Expect many CPU hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"
OUT="${2:-benchmark}"
STORE="${SPD_FEATURES:-$HOME/.cache/spdsegment/features}"
PY=.venv/bin/python
SPD=.venv/bin/spd
M="$OUT/models"
mkdir -p "$M"
declare -A AXES=([hippocampus]="0 1 2" [left_atrium]="0 1")
declare -A STEPS=([hippocampus]=900 [left_atrium]=700)
declare -A UNET_EPOCHS=([hippocampus]=30 [left_atrium]=30)
declare -A UNET_SHRINK=([hippocampus]=1 [left_atrium]=2)
$PY scripts/encode_features.py --data "$DATA" --store "$STORE" --plan hippocampus:1 hippocampus:0 hippocampus:2 \
  left_atrium:0 left_atrium:1
for ds in hippocampus left_atrium; do
  common=(--data "$DATA/$ds" --dataset "$ds" --cache-dir "$STORE" --axes ${AXES[$ds]} --seed 0
          --stage1-max-steps "${STEPS[$ds]}" --stage2-steps 100 --keep-work)
  $SPD train "${common[@]}" --out "$M/${ds}_spd.spd.safetensors"
  # the variants share stage 1 (same settings and cases): a copy of the work folder resumes it
  for variant in spd_nopsc samtune; do
    cp -r "$M/${ds}_spd.spd.safetensors.work" "$M/${ds}_${variant}.spd.safetensors.work"
  done
  $SPD train "${common[@]}" --resume --out "$M/${ds}_spd_nopsc.spd.safetensors" --psc-weight 0
  $SPD train "${common[@]}" --resume --out "$M/${ds}_samtune.spd.safetensors" --prompt-mode raw --psc-weight 0
  $PY scripts/train_unet.py --data-root "$DATA" --dataset "$ds" --epochs "${UNET_EPOCHS[$ds]}" \
    --shrink "${UNET_SHRINK[$ds]}" --out "$M/${ds}_unet.pt"
done
$SPD evaluate --data-root "$DATA" --models-dir "$M" --store "$STORE" --out-dir "$OUT" --levels clean moderate severe
