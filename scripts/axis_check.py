"""Slicing axis from the clicks (issue 14): voxel-centre clicks with ``--axis auto`` against sub-voxel clicks.

Clean centerline clicks from ``research/simulate.py`` along the benchmark axis (the seeds of ``spd
evaluate``) lie at voxel centres: every axis's integer-plane test fits, so the axis comes from the clicks'
geometry (``prompts.choose_axis``). The same clicks moved off the voxel centres in-plane (a seeded offset of
0.1-0.4 voxel per in-plane coordinate, same voxel) fit only the benchmark axis's planes, as slice-view
clicks do. Both go through SPD with ``axis="auto"`` and the model's trained orientation as the preference,
as ``spd segment`` does; the report gives the axis chosen and why, and Dice against the label.

    python scripts/axis_check.py [--data-root ../shared/data] [--split test_full] [--max-minutes 30]

The bar: the voxel-centre case picks the benchmark axis and its mean Dice is within 0.02 of the sub-voxel case.

``--choices`` runs no network: for each noise level and click spacing (``every_kth``), the clicks rounded to
voxel centres, it counts the axes ``choose_axis`` picks on every case of the split, with the model's trained
orientation as the preference and without one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from SPDSegmentLib.core import prompts as P
from SPDSegmentLib.core.cache import EmbeddingCache
from SPDSegmentLib.core.pipeline import SegmentOptions, load_model, segment, trained_axes
from SPDSegmentLib.research.data import find_cases, load_split
from SPDSegmentLib.research.evaluate import dice_score
from SPDSegmentLib.research.simulate import simulate


def off_centre(ijk: np.ndarray, axis: int, shape, seed: int) -> np.ndarray:
    """The clicks moved 0.1-0.4 voxel (random sign) along each in-plane axis: same voxel, off its centre."""
    rng = np.random.default_rng(seed)
    moved = np.array(ijk, float)
    for a in range(3):
        if a == axis:
            continue
        column = 2 - a  # ijk is reversed array order
        offset = rng.uniform(0.1, 0.4, len(moved)) * rng.choice([-1.0, 1.0], len(moved))
        moved[:, column] = np.clip(moved[:, column] + offset, -0.45, shape[a] - 0.55)
    return moved


def count_choices(args, names, axis: int) -> None:
    """How often ``choose_axis`` picks each axis for voxel-centre clicks, per noise level and click spacing."""
    import collections

    cases = [case.load() for case in find_cases(Path(args.data_root) / args.dataset, names)]
    preferred = trained_axes(args.model, cases[0][0])
    print(f"{args.dataset} {args.split}: {len(cases)} cases, clicks along axis {axis} rounded to voxel centres; "
          f"model preference {preferred}")
    print("| clicks | every k-th slice | with the model's preference | without a preference |")
    print("|---|---|---|---|")
    for level, every_kth in (("clean", 1), ("clean", 2), ("clean", 3), ("mild", 1), ("moderate", 1),
                             ("moderate", 2), ("severe", 1)):
        tallies = {True: collections.Counter(), False: collections.Counter()}
        for index, (volume, label) in enumerate(cases):
            ijk = np.round(simulate(label, axis, level, seed=10_000 + index, every_kth=every_kth).ijk)
            for prefer in (True, False):
                choice = P.choose_axis(ijk, volume, trained_axes(args.model, volume) if prefer else ())
                tallies[prefer][(int(choice), choice.source)] += 1

        def cell(tally):
            return "; ".join(f"axis {a} ({source}) {n}" for (a, source), n in sorted(tally.items()))

        print(f"| {level} | {every_kth} | {cell(tallies[True])} | {cell(tallies[False])} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--dataset", default="hippocampus")
    parser.add_argument("--split", default="test_full")
    parser.add_argument("--model", default="spd-hippocampus")
    parser.add_argument("--level", default="clean")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new case after this long")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", default="axis_check.json")
    parser.add_argument("--choices", action="store_true", help="only count the axes chosen (no network)")
    args = parser.parse_args()

    split = load_split(args.dataset)
    axis = int(split["axis"])
    names = list(split[args.split])[: args.max_cases]
    if args.choices:
        count_choices(args, names, axis)
        return
    model = load_model(args.model, device="cpu", runtime=args.runtime, precision=args.precision)
    runtime = getattr(model.backbone if hasattr(model, "backbone") else model, "runtime_name", args.runtime)
    options = SegmentOptions()
    rows, t_start = [], time.perf_counter()
    print(f"{args.dataset} {args.split}: {len(names)} cases, {args.level} clicks along axis {axis}, "
          f"model {args.model} ({runtime})", flush=True)
    for index, case in enumerate(find_cases(Path(args.data_root) / args.dataset, names)):
        if args.max_minutes is not None and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"time budget reached after {len(rows)} cases", flush=True)
            break
        volume, label = case.load()
        sim = simulate(label, axis, args.level, seed=10_000 + names.index(case.name))
        preferred = trained_axes(model, volume)
        row = {"case": case.name, "clicks": len(sim.ijk)}
        cache = EmbeddingCache()  # one case at a time: both variants share the slices they have in common
        for variant, ijk in (("centre", sim.ijk), ("off_centre", off_centre(sim.ijk, axis, volume.shape, index))):
            vp = P.to_voxels(P.from_ijk(ijk, sim.labels), volume, axis="auto", preferred_axes=preferred)
            t0 = time.perf_counter()
            result = segment(volume, vp, model, options, cache=cache)
            row[variant] = {"axis": vp.axis, "source": vp.axis_source, "dice": dice_score(result.mask, label),
                            "seconds": round(time.perf_counter() - t0, 2), "note": result.axis_note}
        rows.append(row)
        print(f"{case.name}: centre axis {row['centre']['axis']} ({row['centre']['source']}) "
              f"Dice {row['centre']['dice']:.3f} | off-centre axis {row['off_centre']['axis']} "
              f"({row['off_centre']['source']}) Dice {row['off_centre']['dice']:.3f}", flush=True)

    centre = np.array([r["centre"]["dice"] for r in rows])
    off = np.array([r["off_centre"]["dice"] for r in rows])
    right = sum(r["centre"]["axis"] == axis for r in rows)
    sources = sorted({r["centre"]["source"] for r in rows})
    summary = {"n": len(rows), "axis": axis, "centre_right_axis": right, "centre_sources": sources,
               "dice_centre_mean": float(centre.mean()), "dice_centre_sd": float(centre.std(ddof=1)),
               "dice_off_centre_mean": float(off.mean()), "dice_off_centre_sd": float(off.std(ddof=1)),
               "difference_mean": float((centre - off).mean()),
               "difference_max_abs": float(np.abs(centre - off).max()),
               "passes": bool(right == len(rows) and abs(float((centre - off).mean())) <= 0.02)}
    report = {"command": "python scripts/axis_check.py " + " ".join(sys.argv[1:]), "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runtime": runtime,
              "seconds": round(time.perf_counter() - t_start), "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"n={summary['n']}: voxel-centre clicks picked axis {axis} in {right}/{len(rows)} ({', '.join(sources)}); "
          f"Dice centre {summary['dice_centre_mean']:.4f} (sd {summary['dice_centre_sd']:.3f}) vs off-centre "
          f"{summary['dice_off_centre_mean']:.4f} (sd {summary['dice_off_centre_sd']:.3f}); mean difference "
          f"{summary['difference_mean']:+.4f}, largest per case {summary['difference_max_abs']:.4f}; "
          f"{'passes' if summary['passes'] else 'FAILS'} the 0.02 bar -> {args.out}")


if __name__ == "__main__":
    main()
