"""A cohort of N volumes for the batch measurements (docs/performance.md, "Cohorts"), made from the
shared hippocampus cases: each resampled to a random voxel size, cut to a slab of ``--slab`` slices
across the middle of the structure along the dataset's slicing axis (small cases, so that 100 of them
take minutes on 2 cores: the encoder's cost is per slice), and flipped along random axes, with
simulated clicks (``research.simulate``, moderate noise) along that axis.

    python scripts/make_cohort.py --data ../shared/data/hippocampus --out /tmp/cohort --cases 100 --slab 2

Writes OUT/imagesTr/cohort_NNN.nii.gz, OUT/labelsTr/cohort_NNN.nii.gz, OUT/points/cohort_NNN.mrk.json
and OUT/manifest.csv (the same cases as a manifest). The same arguments give the same files (seeded).
Write it outside the repository: the shared data and anything made from it are never committed.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SPDSegmentLib.core import volume
from SPDSegmentLib.research.data import find_cases, load_split
from SPDSegmentLib.research.simulate import simulate


def resampled(image, spacing, interpolator):
    size = [max(8, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def slab_of(image, label, axis: int, slab: int):
    """``image`` and ``label`` cut to ``slab`` slices along array ``axis`` around the structure's middle
    (SimpleITK keeps the geometry: the cut lies where it was)."""
    present = np.flatnonzero(np.any(sitk.GetArrayFromImage(label) > 0, axis=tuple(a for a in range(3) if a != axis)))
    dim = 2 - axis  # array axis (k, j, i) -> image dimension (i, j, k)
    start = int(np.clip((present[0] + present[-1]) // 2 - slab // 2, 0, max(0, image.GetSize()[dim] - slab)))
    size, index = list(image.GetSize()), [0, 0, 0]
    size[dim], index[dim] = min(slab, size[dim]), start
    return sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(label, size, index)


def make_case(source, out: Path, name: str, rng: np.random.Generator, axis: int, seed: int, slab: int) -> int:
    """One new case from ``source``; returns its number of clicks."""
    image, label = sitk.ReadImage(str(source.image)), sitk.ReadImage(str(source.label))
    spacing = [s * f for s, f in zip(image.GetSpacing(), rng.uniform(0.9, 1.4, size=3))]
    image = resampled(image, spacing, sitk.sitkLinear)
    label = resampled(label, spacing, sitk.sitkNearestNeighbor)
    if slab:
        image, label = slab_of(image, label, axis, slab)
    flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.5))  # array axes (k, j, i) to mirror
    image_array = np.flip(sitk.GetArrayFromImage(image), flips).copy()
    mask = (np.flip(sitk.GetArrayFromImage(label), flips) > 0).astype(np.uint8)
    ijk_to_lps = volume.geometry_matrix(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    volume.write_image(out / "imagesTr" / f"{name}.nii.gz", image_array, ijk_to_lps)
    volume.write_image(out / "labelsTr" / f"{name}.nii.gz", mask, ijk_to_lps)
    clicks = simulate(mask, axis, "moderate", seed=seed)
    clicks.to_markups(out / "points" / f"{name}.mrk.json", ijk_to_lps)
    return len(clicks.ijk)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/hippocampus", help="an MSD folder (imagesTr, labelsTr)")
    parser.add_argument("--dataset", default="hippocampus", help="its split's slicing axis is the clicks' axis")
    parser.add_argument("--out", default="/tmp/cohort")
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--slab", type=int, default=2, help="slices along the slicing axis (0: the whole volume)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    sources = find_cases(Path(args.data))
    axis = int(load_split(args.dataset)["axis"])
    rng = np.random.default_rng(args.seed)
    rows = []
    for index in range(args.cases):
        name = f"cohort_{index:03d}"
        clicks = make_case(sources[index % len(sources)], out, name, rng, axis, args.seed + index, args.slab)
        rows.append({"case": name, "image": f"imagesTr/{name}.nii.gz", "points": f"points/{name}.mrk.json"})
        print(f"{name}: from {sources[index % len(sources)].name}, {clicks} clicks", flush=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "points"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} cases -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
