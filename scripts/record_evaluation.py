"""Write a model's measured test results (from `spd evaluate`'s summary.csv and meta.json) into its header.

Usage: python scripts/record_evaluation.py --results OUT_DIR --dataset hippocampus --model MODEL.spd.safetensors

`spd models` shows the moderate-noise Dice; the header keeps Dice and HD95 per noise level (main view),
Dice per view at moderate noise, the U-Net's Dice on the same cases, the command, machine and date.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.core import spd_model  # noqa: E402
from SPDSegmentLib.research.data import load_split  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="the --out-dir of spd evaluate")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    results = Path(args.results)
    meta = json.loads((results / "meta.json").read_text())
    with open(results / "summary.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["dataset"] == args.dataset]
    main_axis = int(load_split(args.dataset)["axis"])
    spd_main = [r for r in rows if r["method"] == "spd" and int(r["axis"]) == main_axis]
    unet = [r for r in rows if r["method"] == "unet" and r["level"] == "moderate"]
    evaluation = {
        "command": meta["command"], "date": meta["date"], "machine": meta["machine"],
        "split": f"{args.dataset} test_full ({spd_main[0]['n']} cases, splits.json), clicks from spd simulate",
        "method": "spd as shipped (this file's settings)",
        "dice": {r["level"]: round(float(r["dice_mean"]), 3) for r in spd_main},
        "hd95_mm": {r["level"]: round(float(r["hd95_mean"]), 2) for r in spd_main},
        "dice_by_view_moderate": {r["view"]: round(float(r["dice_mean"]), 3) for r in rows
                                  if r["method"] == "spd" and r["level"] == "moderate"},
    }
    if unet:
        evaluation["unet_dice_moderate"] = round(float(unet[0]["dice_mean"]), 3)
    header = spd_model.update_header(args.model, evaluation=evaluation)
    print(json.dumps(header["evaluation"], indent=1))


if __name__ == "__main__":
    main()
