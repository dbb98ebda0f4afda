"""Statistics of the noisy-prompt simulator per level (the table in docs/noise_model.md).

Usage: python scripts/noise_stats.py   (from the repository root, with the project installed)
"""
import numpy as np
import SimpleITK as sitk

from SPDSegmentLib.core.sample import sample_case
from SPDSegmentLib.research.simulate import LEVELS, simulate


def ellipsoid(shape=(24, 60, 28), centre=(12.0, 30.0, 14.0), semi=(7.0, 24.0, 9.0)):
    """The elongated ellipsoid of Testing/test_simulate.py (long axis = array axis 1)."""
    grid = np.indices(shape, dtype=float)
    return (sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi)) <= 1.0).astype(np.uint8)


def main(seeds: int = 30) -> None:
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_case().label))) > 0
    print("| mask | level | clicks per case | centerline clicks inside | all reader clicks inside |")
    print("|---|---|---|---|---|")
    for name, mask in (("ellipsoid", ellipsoid()), ("hippocampus_001", label.astype(np.uint8))):
        for level in LEVELS:
            runs = [simulate(mask, 1, level, seed) for seed in range(seeds)]
            clicks = np.mean([len(r.ijk) for r in runs])
            centre = np.concatenate([r.inside[r.kind == "centerline"] for r in runs]).mean()
            reader = np.concatenate([r.inside[r.kind != "spurious"] for r in runs]).mean()
            print(f"| {name} | {level} | {clicks:.1f} | {100 * centre:.0f} % | {100 * reader:.0f} % |")


if __name__ == "__main__":
    main()
