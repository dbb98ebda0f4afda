"""How many cases must a user label? SPD's Dice at moderate noise against the number of training cases.

Usage:
  python scripts/learning_curve.py --data-root ../shared/data --store FEATURES --out docs/benchmark/learning_curve
         [--datasets hippocampus left_atrium] [--counts 1 3 5 10 30 all] [--final hippocampus=MODEL ...]
         [--set stage2_steps=100 ...] [--test-cases N]

For each dataset and count n, trains `spd train`'s default recipe on the first n cases of the fixed
`train_full` split (every view), then runs SPD as shipped on the whole `test_full` split, main view,
moderate clicks. Reports per n: Dice and HD95 (mean, sd), the CPU seconds of training (from the model
header: stage 1 and stage 2, embeddings read from the feature store) and of encoding those cases
(slices x the encoder's measured seconds per slice here), as learning_curve.csv/.md/.png.
"`all`" may reuse a finished model (`--final DATASET=PATH`).
"""
import argparse
import ast
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.core import pipeline  # noqa: E402
from SPDSegmentLib.research import ladder, train  # noqa: E402
from SPDSegmentLib.research.data import find_cases, load_split, training_slices  # noqa: E402
from SPDSegmentLib.research.features import FeatureStore, MARGIN  # noqa: E402
from SPDSegmentLib.research.metrics import score  # noqa: E402


def encoder_seconds_per_slice(backbone) -> float:
    import torch

    image = [np.random.default_rng(0).random((64, 64), dtype=np.float32)]
    with torch.inference_mode():
        backbone.encode(backbone.prepare(image))
        t0 = time.perf_counter()
        for _ in range(5):
            backbone.encode(backbone.prepare(image))
    return (time.perf_counter() - t0) / 5


def evaluate(model, dataset, data_root, store, level="moderate", max_cases=0):
    """SPD as shipped on the test split's main view: ``ladder.run_case``'s spd rung, the benchmark's seeds."""
    split = load_split(dataset)
    axis = int(split["axis"])
    names = split["test_full"][:max_cases] if max_cases else split["test_full"]
    rows = []
    for index, case in enumerate(find_cases(data_root / dataset, names)):
        volume, label = case.load()
        mask = ladder.run_case(model, volume, label, axis, level, 10_000 + index,
                               store.entry(dataset, case.name, axis), rungs=("spd",))["spd"]
        rows.append(score(mask, label, volume.spacing[::-1]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--datasets", nargs="*", default=["hippocampus", "left_atrium"],
                    help="datasets to train and evaluate (none: only report --previous runs)")
    ap.add_argument("--counts", nargs="+", default=["1", "3", "5", "10", "30", "all"])
    ap.add_argument("--final", nargs="*", default=[], help="DATASET=MODEL: use this model for 'all'")
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig field=value (a Python literal)")
    ap.add_argument("--test-cases", type=int, default=0, help="only the first N test cases (0: all)")
    ap.add_argument("--previous", nargs="*", default=[], help="learning_curve.csv files of earlier runs to report with")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root)
    store = FeatureStore(args.store)
    finals = dict(item.split("=", 1) for item in args.final)
    settings = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    backbone = pipeline.load_model("litemedsam", device="cpu")
    per_slice = encoder_seconds_per_slice(backbone)
    table = []
    for path in args.previous:  # earlier runs (other datasets or counts), reported together
        with open(path, newline="") as handle:
            table += [{k: (v if k == "dataset" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]
    for dataset in args.datasets:
        names = load_split(dataset)["train_full"]
        for count in args.counts:
            n = len(names) if count == "all" else min(int(count), len(names))
            cases = names[:n]
            model_path = Path(finals[dataset]) if count == "all" and dataset in finals else \
                out / "models" / f"{dataset}_{n}.spd.safetensors"
            if not model_path.exists():
                config = train.TrainConfig(data=str(data_root / dataset), out=str(model_path), cases=cases,
                                           cache_dir=args.store, **settings)
                train.train(config)
            model = pipeline.load_model(str(model_path), device="cpu")
            header = model.header
            slices = sum(len(training_slices(c.load()[1], a, MARGIN)) for c in find_cases(data_root / dataset, cases)
                         for a in header.get("axes", [0, 1, 2]))
            rows = evaluate(model, dataset, data_root, store, max_cases=args.test_cases)
            dice = np.array([r["dice"] for r in rows])
            hd95 = np.array([r["hd95"] for r in rows])
            entry = {"dataset": dataset, "cases": n, "test_cases": len(rows), "dice_mean": dice.mean(),
                     "dice_sd": dice.std(ddof=1), "hd95_mean": hd95.mean(), "train_s": header["training"]["seconds"],
                     "slices": slices, "encode_s": slices * per_slice}
            table.append(entry)
            print(f"{dataset} {n} cases: Dice {entry['dice_mean']:.3f} ± {entry['dice_sd']:.3f}, training "
                  f"{entry['train_s'] / 60:.1f} min + encoding {entry['encode_s'] / 60:.1f} min", flush=True)
    table.sort(key=lambda e: (e["dataset"], e["cases"]))
    with open(out / "learning_curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = ["| dataset | training cases (test cases) | Dice (moderate) | HD95 (mm) | training (min) | encoding (min) | total (min) |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['dataset']} | {e['cases']:.0f} ({e['test_cases']:.0f}) | "
                     f"{e['dice_mean']:.3f} ± {e['dice_sd']:.3f} | "
                     f"{e['hd95_mean']:.1f} | {e['train_s'] / 60:.1f} | {e['encode_s'] / 60:.1f} | "
                     f"{(e['train_s'] + e['encode_s']) / 60:.1f} |")
    (out / "learning_curve.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dataset in sorted({e["dataset"] for e in table}):
        mine = sorted((e for e in table if e["dataset"] == dataset), key=lambda e: e["cases"])
        ax.errorbar([e["cases"] for e in mine], [e["dice_mean"] for e in mine], [e["dice_sd"] for e in mine],
                    marker="o", capsize=3, label=dataset)
        for e in mine:
            ax.annotate(f"{(e['train_s'] + e['encode_s']) / 60:.0f} min", (e["cases"], e["dice_mean"]),
                        textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training cases (log scale); labels: CPU minutes to train, encoding included")
    ax.set_ylabel("Dice, moderate clicks (test split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
