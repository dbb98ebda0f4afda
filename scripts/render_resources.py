"""The extension's index images, rendered from a real SPD run on the bundled sample case.

A screenshot of the extension in use needs a desktop Slicer, which the build machine does not have. This
renders the next best thing from the same data a user would see: the sample case (MSD hippocampus_001)
in three slice views laid out and coloured as Slicer's (red axial, green coronal, yellow sagittal), the
SPD segment from the default model, and the clicks as the effect shows them after Preview (kept green,
rejected red, borrowed yellow). Each image says in its corner that it is a rendering.

    python scripts/render_resources.py [--out Resources]

Writes ``Screenshots/spd_sample_case.png`` (the index's screenshot) and ``SampleData/SPDSegmentSample.png``
(the Sample Data module's thumbnail, 260 x 280).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.core import prompts, volume  # noqa: E402
from SPDSegmentLib.core.pipeline import SegmentOptions, load_model, segment  # noqa: E402
from SPDSegmentLib.core.sample import sample_case  # noqa: E402

VIEWS = (("Red", "axial", 0, "#c84646"), ("Green", "coronal", 1, "#6cb36c"), ("Yellow", "sagittal", 2, "#e3c54b"))
AUDIT = {"kept": "#1acc33", "rejected": "#e61a1a", "borrowed": "#f2d91a"}
SEGMENT = "#dc8a5a"  # Slicer's first segment colour family (a warm tissue colour)
NOTE = "Rendered from SPD's output on the sample case (not a Slicer screen capture)"


def run_spd():
    case = sample_case()
    image = volume.read(case.image)
    clicks = prompts.to_voxels(prompts.read(case.clicks), image, axis=case.axis)
    result = segment(image, clicks, load_model(device="cpu"), SegmentOptions(mode="spd"))
    return image, clicks, result


def slice_of(array, axis, index):
    plane = np.take(array, index, axis=axis)
    return plane[::-1] if axis != 0 else plane  # superior up in coronal and sagittal views


def draw_view(ax, image, mask, result, axis, index, title, colour):
    import matplotlib.patheffects as effects

    lo, hi = np.percentile(image.array[image.array > 0], [0.5, 99.5])
    ax.imshow(slice_of(image.array, axis, index), cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
    plane = slice_of(mask, axis, index).astype(float)
    ax.imshow(np.ma.masked_where(plane == 0, plane), cmap=_single(SEGMENT), alpha=0.45, interpolation="nearest")
    ax.contour(plane, levels=[0.5], colors=[SEGMENT], linewidths=1.6)
    if axis == result.axis:
        for entry in result.audit or []:
            if entry.slice != index:
                continue
            row, col = entry.rc
            row = plane.shape[0] - 1 - row if axis != 0 else row  # the view is flipped so superior is up
            ax.plot(col, row, "o", ms=6, mfc=AUDIT[entry.status], mec="black", mew=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(colour)
        spine.set_linewidth(3)
    ax.set_title(f"{title}", color="white", fontsize=10, loc="left", backgroundcolor=colour, pad=2,
                 path_effects=[effects.withStroke(linewidth=0)])


def _single(colour):
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


def best_slice(mask, axis, result):
    """The slice of ``axis`` with the most segment voxels (for the clicks' axis: the one with most clicks)."""
    if axis == result.axis and result.audit:
        slices = [e.slice for e in result.audit]
        return max(set(slices), key=lambda s: (slices.count(s), np.take(mask, s, axis=axis).sum()))
    return int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis))))


def screenshot(path: Path, image, clicks, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = result.mask
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="#2b2b2b")
    for ax, (name, plane, axis, colour) in zip(axes, VIEWS):
        index = best_slice(mask, axis, result)
        draw_view(ax, image, mask, result, axis, index, f" {name}: {plane} slice {index} ", colour)
    counts = {s: sum(e.status == s for e in result.audit or []) for s in AUDIT}
    legend = "   ".join(f"{s} {counts[s]}" for s in AUDIT)
    figure.text(0.01, 0.06, f"SPD segment ({result.voxels} voxels) from {len(clicks)} sloppy clicks; in all slices: "
                f"{legend} (clicks in the {VIEWS[result.axis][1]} slice shown green, red, yellow)", color="white",
                fontsize=9)
    figure.text(0.01, 0.015, NOTE, color="#bbbbbb", fontsize=8)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.12, wspace=0.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor=figure.get_facecolor())
    plt.close(figure)


def thumbnail(path: Path, image, result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(2.6, 2.8), dpi=100, facecolor="#2b2b2b")
    ax = figure.add_axes([0.03, 0.1, 0.94, 0.82])
    axis = result.axis
    name, plane, _, colour = VIEWS[axis]
    draw_view(ax, image, result.mask, result, axis, best_slice(result.mask, axis, result), f" {plane} ", colour)
    figure.text(0.5, 0.03, "SPD sample: hippocampus MRI (rendering)", color="white", fontsize=8, ha="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, facecolor=figure.get_facecolor())
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "Resources"),
                        help="the extension's top-level Resources folder")
    args = parser.parse_args()
    image, clicks, result = run_spd()
    out = Path(args.out)
    screenshot(out / "Screenshots" / "spd_sample_case.png", image, clicks, result)
    thumbnail(out / "SampleData" / "SPDSegmentSample.png", image, result)
    print(f"SPD: {result.summary()}; wrote {out / 'Screenshots' / 'spd_sample_case.png'} and "
          f"{out / 'SampleData' / 'SPDSegmentSample.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
