"""Corrections on top of a result: a local threshold field, pure numpy.

A run's clicks give, per decoded slice, a foreground probability ``P`` (decoder and saliency
averaged, ``pipeline.segment``) that is thresholded at 0.5. A correction says "here the result is
wrong": a background click inside the result, a foreground correction outside it. It moves the
threshold near itself to just past the probability at the click:

    theta_c = P(click) + margin   (background: everything near it up to the click's confidence goes)
    theta_c = P(click) - margin   (foreground: everything near it at least that confident comes in)
    w_c(x)  = exp(-d_plane(x)^2 / (2 sigma^2) - d_across(x)^2 / (2 sigma_across^2)), 0 beyond 3 sigma
    theta(x) = 0.5 + w(x) (theta_c - 0.5), from the correction of the largest weight at x

with distances in millimetres within the slice and across slices, and the mask is ``P > theta``.
So a correction removes (adds) the region around it that the models were no more (no less) sure of
than of the clicked voxel, strongly on its own slice and fading over the neighbouring slices where
that region continues; the clicked voxel itself always changes; voxels more than 3 sigma away never
do. The same click list gives the same mask (no state: the base result is recomputed from the
clicks, its decoded slices recalled from the cache). docs/benchmarks.md ("Corrections") has the
measurements behind the design and the constants, and the alternatives that did not help.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

SIGMA_MM = 8.0  # in-plane width of a correction's reach (docs/benchmarks.md, "Corrections")
SIGMA_ACROSS_MM = 4.0  # across slices
MARGIN = 0.02  # how far past the clicked voxel's probability the threshold moves
TRUNCATE = 3.0  # no change beyond this many sigmas


@dataclass(frozen=True)
class Correction:
    """One correction click on its slice."""

    slice: int
    rc: np.ndarray  # (2,) in-plane (row, col), continuous
    label: int  # 1: add the structure here; 0: remove the wrong region here


def corrections_of(prompts) -> List[Correction]:
    """The corrections of ``prompts`` (``prompts.VoxelPrompts``), in click order."""
    chosen = np.flatnonzero(prompts.is_correction())
    if not len(chosen):
        return []
    t, rc = prompts.slice_index(), prompts.rc()
    return [Correction(int(t[i]), np.asarray(rc[i], float), int(prompts.labels[i])) for i in chosen]


def reach(spacing_across: float, sigma_across_mm: float = SIGMA_ACROSS_MM) -> int:
    """How many slices on each side a correction can change (the field's truncation across slices)."""
    return int(np.ceil(TRUNCATE * sigma_across_mm / max(float(spacing_across), 1e-6)))


def threshold_field(probabilities: Dict[int, np.ndarray], corrections: Sequence[Correction],
                    spacing_rc: Tuple[float, float], spacing_across: float, sigma_mm: float = SIGMA_MM,
                    sigma_across_mm: float = SIGMA_ACROSS_MM) -> Dict[int, np.ndarray]:
    """Per slice of ``probabilities`` (t -> P on the slice grid): the threshold the corrections set (module
    docstring); 0.5 where no correction reaches. Only slices that have a probability are changed.

    Args:
      probabilities: slice -> foreground probability (h, w) of the run before corrections.
      corrections: the corrections, in click order (a later one wins a tie).
      spacing_rc: in-plane voxel size in mm (rows, columns); spacing_across: the slice spacing in mm.
      sigma_mm, sigma_across_mm: the field's widths (the defaults ship; scripts/correction_variants.py tries others).
    """
    thresholds = {t: np.full(np.shape(p), 0.5, np.float32) for t, p in probabilities.items()}
    if not corrections or not probabilities:
        return thresholds
    shape = np.shape(next(iter(probabilities.values())))
    rows, cols = (np.arange(n, dtype=np.float32) for n in shape)
    weights = {t: np.zeros(shape, np.float32) for t in probabilities}
    slices = reach(spacing_across, sigma_across_mm)
    for correction in corrections:
        own = probabilities.get(correction.slice)
        if own is None:
            continue  # nothing was segmented on its slice, and nothing around it to weigh against
        r, c = np.clip(np.rint(correction.rc).astype(int), 0, np.array(shape) - 1)
        clicked = float(own[r, c])
        target = clicked + MARGIN if correction.label == 0 else clicked - MARGIN
        d2 = (((rows - correction.rc[0]) * spacing_rc[0]) ** 2)[:, None] + \
            (((cols - correction.rc[1]) * spacing_rc[1]) ** 2)[None, :]
        inside = d2 <= (TRUNCATE * sigma_mm) ** 2
        plane = np.where(inside, np.exp(-d2 / (2 * sigma_mm ** 2)), 0.0).astype(np.float32)
        for t in range(correction.slice - slices, correction.slice + slices + 1):
            if t not in probabilities:
                continue
            across = ((t - correction.slice) * spacing_across) ** 2 / (2 * sigma_across_mm ** 2)
            weight = plane * np.float32(np.exp(-across))
            wins = weight >= weights[t]
            wins &= weight > 0
            thresholds[t][wins] = 0.5 + weight[wins] * (target - 0.5)
            weights[t][wins] = weight[wins]
    return thresholds


def touched_slices(corrections: Sequence[Correction], spacing_across: float, n_slices: int) -> List[int]:
    """The slices the corrections can change (each correction's slice and its reach), inside the volume."""
    slices = reach(spacing_across)
    out = set()
    for correction in corrections:
        out.update(range(max(0, correction.slice - slices), min(n_slices, correction.slice + slices + 1)))
    return sorted(out)
