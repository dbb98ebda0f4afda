"""Encode every labelled slice (+-3) of a dataset, in all three orientations, into a feature store.

Usage: python scripts/encode_features.py --data ../shared/data --store FEATURES [--datasets hippocampus left_atrium]
       [--axes 1 0 2] [--splits test_full train_full]

One file pair per case and axis: ``{dataset}/{case}/axis{a}.npz``-like (int8 embeddings + per-channel
scales + slice list), written atomically, so the job can be stopped and resumed.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.research.features import FeatureStore, encode_case  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--datasets", nargs="+", default=["hippocampus", "left_atrium"])
    ap.add_argument("--axes", nargs="+", type=int, default=None)
    ap.add_argument("--splits", nargs="+", default=["test_full", "train_full"])
    ap.add_argument("--plan", nargs="+", default=None, help="dataset:axis items in order, e.g. hippocampus:1")
    ap.add_argument("--reverse", action="store_true", help="cases in reverse order (a second process fills from the end)")
    args = ap.parse_args()
    from SPDSegmentLib.core.pipeline import load_model
    from SPDSegmentLib.research.data import find_cases, load_split

    backbone = load_model("litemedsam", device="cpu", runtime="auto", precision="auto")
    store = FeatureStore(args.store)
    plan = [tuple(p.split(":")) for p in args.plan] if args.plan else [
        (d, a) for d in args.datasets for a in (args.axes or [0, 1, 2])]
    for dataset, axis in plan:
        axis = int(axis)
        split = load_split(dataset)
        names = [n for s in args.splits for n in split[s]]
        cases = find_cases(Path(args.data) / dataset, names)
        if args.reverse:
            cases = cases[::-1]
        t0 = time.time()
        done = 0
        for i, case in enumerate(cases):
            if store.has(dataset, case.name, axis):
                continue  # (the training command checks the cache key; this fill-up trusts what is there)
            volume, label = case.load()
            n = len(encode_case(store, dataset, case.name, volume, label, axis, backbone).slices)
            done += n
            rate = done / max(time.time() - t0, 1e-6)
            print(f"{dataset} axis {axis} {i + 1}/{len(cases)} {case.name}: {n} slices encoded "
                  f"({rate:.2f} slices/s)", flush=True)


if __name__ == "__main__":
    main()
