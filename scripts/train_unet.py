"""The supervised baseline of docs/benchmarks.md: a 2D U-Net (no prompts) on a dataset's train_full split.

Usage: python scripts/train_unet.py --data-root ../shared/data --dataset hippocampus --out MODELS/hippocampus_unet.pt
       [--epochs 30] [--shrink 1]

`spd evaluate --models-dir MODELS` finds it as DATASET_unet.pt and predicts every slice of the split's main axis.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.research import unet  # noqa: E402
from SPDSegmentLib.research.data import find_cases, load_split  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--dataset", required=True, choices=["hippocampus", "left_atrium"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=int, default=1, help="train and predict on slices shrunk by this factor in-plane")
    args = ap.parse_args()
    split = load_split(args.dataset)
    cases = find_cases(Path(args.data_root) / args.dataset, split["train_full"])
    started = time.time()
    unet.train_unet(cases, int(split["axis"]), Path(args.out), epochs=args.epochs, seed=args.seed,
                    shrink=args.shrink)
    print(f"U-Net {args.dataset}: {len(cases)} cases, {args.epochs} epochs, shrink {args.shrink}, {time.time() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
