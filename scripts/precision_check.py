"""Does a faster runtime or precision cost Dice? SPD as shipped, on the benchmark test splits.

Runs the same simulated clicks (the seeds of ``spd evaluate``) through SPD with each runtime /
precision and reports mean Dice per dataset and noise level, the paired difference to eager
PyTorch fp32, and its worst case. The bar (issue 5): a lossy lever may cost at most 0.5 Dice points.

    python scripts/precision_check.py --models-dir MODELS [--data-root ../shared/data]

MODELS holds ``{dataset}_spd.spd.safetensors`` for each dataset (the benchmark models,
docs/benchmarks.md); the bundled spd-hippocampus is used for hippocampus when it is missing.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from SPDSegmentLib.core import spd_model
from SPDSegmentLib.core.cache import EmbeddingCache
from SPDSegmentLib.core.models.registry import BUNDLED_SPD_MODELS
from SPDSegmentLib.core.pipeline import SegmentOptions, segment
from SPDSegmentLib.research.data import find_cases, load_split
from SPDSegmentLib.research.evaluate import dice_score
from SPDSegmentLib.research.simulate import simulate

CONFIGS = [("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--datasets", nargs="*", default=["hippocampus", "left_atrium"])
    parser.add_argument("--levels", nargs="*", default=["clean", "mild", "moderate", "severe"])
    parser.add_argument("--configs", nargs="*", default=[f"{r}-{p}" for r, p in CONFIGS],
                        help="runtime-precision pairs to run (torch-fp32 is the reference)")
    parser.add_argument("--merge", help="a JSON written by an earlier run whose rows are reused")
    parser.add_argument("--out", default="precision_check.json")
    args = parser.parse_args()
    configs = [tuple(c.split("-")) for c in args.configs]
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else {"commands": [], "rows": []}
    report = {"commands": earlier.get("commands", [earlier.get("command")]) +
              ["python scripts/precision_check.py " + " ".join(sys.argv[1:])],
              "date": date.today().isoformat(), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "rows": earlier["rows"]}
    done = {(r["runtime"], r["precision"]) for r in report["rows"]}
    for dataset in args.datasets:
        split = load_split(dataset)
        axis = int(split["axis"])
        path = Path(args.models_dir) / f"{dataset}_spd.spd.safetensors"
        if not path.exists() and dataset == "hippocampus":
            path = BUNDLED_SPD_MODELS["spd-hippocampus"]
        cases = [c.load() + (c.name,) for c in find_cases(Path(args.data_root) / dataset, split["test"])]
        for runtime, precision in configs:
            if (runtime, precision) in done:
                continue
            model = spd_model.load(path, device="cpu")
            model.backbone.set_runtime(runtime, precision)
            cache = EmbeddingCache(max_bytes=6 << 30)
            t0 = time.perf_counter()
            for index, (volume, label, name) in enumerate(cases):
                for level in args.levels:
                    sim = simulate(label, axis, level, seed=10_000 + index)  # evaluate's seeds (seed 0)
                    clicks = sim.voxel_prompts(volume)
                    result = segment(volume, clicks, model, SegmentOptions(mode="spd"), cache=cache)
                    report["rows"].append(dict(dataset=dataset, case=name, level=level, runtime=runtime,
                                               precision=precision, dice=dice_score(result.mask, label)))
            print(f"{dataset} {runtime}-{precision}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = report["rows"]
    print(f"{'dataset':12} {'level':9} {'config':15} {'mean Dice':>9} {'diff vs torch-fp32':>19} {'worst case':>10}")
    for dataset in args.datasets:
        for level in args.levels:
            def dice(runtime, precision):
                return np.array([r["dice"] for r in rows if (r["dataset"], r["level"], r["runtime"], r["precision"])
                                 == (dataset, level, runtime, precision)])
            reference = dice("torch", "fp32")
            for runtime, precision in CONFIGS:
                d = dice(runtime, precision)
                if not len(d):
                    continue
                diff = d - reference
                print(f"{dataset:12} {level:9} {runtime + '-' + precision:15} {d.mean():9.4f} "
                      f"{100 * diff.mean():+18.2f}p {100 * diff.min():+9.2f}p")
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
