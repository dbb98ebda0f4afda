"""Noisy centerline prompts: how a hurried reader clicks a tubular or elongated structure.

SPD is evaluated under *sloppy* point prompts. Rather than asking readers to click every case
several times, the benchmarks simulate one reader who scrolls through the structure along a
slicing axis and drops one point per slice "roughly in the middle" of it. A hurried reader:

- clicks near, not at, the middle of the structure (``displacement``),
- sometimes lands on the neighbouring tissue instead (``drift_fraction``),
- skips some slices altogether (``missing_fraction``),
- leaves a few stray clicks around (``spurious_per_slice``),
- may click only every k-th slice (``every_kth``).

The levels are fixed here so that every benchmark, test and demo uses the same noise:

| level      | every_kth | displacement (x local radius) | drift_fraction | missing_fraction | spurious_per_slice | drift_max | missing_run |
|------------|-----------|-------------------------------|----------------|------------------|--------------------|-----------|-------------|
| `clean`    | 1         | 0.00                          | 0.00           | 0.00             | 0.00               | 3         | 1           |
| `mild`     | 1         | 0.25                          | 0.05           | 0.10             | 0.05               | 3         | 1           |
| `moderate` | 1         | 0.50                          | 0.15           | 0.25             | 0.10               | 3         | 1           |
| `severe`   | 1         | 0.80                          | 0.30           | 0.40             | 0.20               | 3         | 1           |
| `harsh`    | 1         | 1.00                          | 0.40           | 0.50             | 0.30               | 5         | 4           |

The first four are the benchmark's levels. ``harsh`` (added for the correction benchmark) drifts
further (up to ``drift_max`` = 5 local radii outside instead of 3) and skips runs of ``missing_run``
= 4 consecutive slices instead of single slices: a start as bad as an independent noise model's
severe level, to see what corrections recover.

``every_kth`` is 1 at every level so that the levels differ only in noise; pass ``every_kth=``
to :func:`simulate` to study sparser clicking. See ``docs/noise_model.md`` for the rationale.

The model, precisely (``r`` is the *local radius* of the slice: the largest 2D Euclidean distance
from a voxel of the slice's largest connected component to the background, in voxels; the
*medial point* is where that maximum is reached, see :func:`centerline`):

1. **Schedule.** The structure slices along ``axis`` (slices with at least one foreground voxel)
   are listed in order; the reader visits every ``every_kth``-th of them starting with the first,
   and always the last one too (a reader marks both ends of the structure).
2. **Missing slices.** Exactly ``round(missing_fraction * n_scheduled)`` scheduled slices get no
   click at all. The first and last scheduled slices are never dropped (the reader always marks the
   ends, so the extent of the structure stays defined); the count is capped at ``n_scheduled - 2``.
   They come in runs of ``missing_run`` consecutive scheduled slices (1 but at ``harsh``), each run
   starting at the next slice of one fixed random order.
3. **Drift.** On the remaining (*prompted*) slices, exactly ``round(drift_fraction * n_prompted)``
   of the reader's clicks drift: the click is placed outside the mask, in the same slice, at a
   distance ``d ~ Uniform(r, drift_max r)`` (3 r but at ``harsh``) from the mask (distance from a
   background voxel to the nearest
   foreground voxel of the whole slice, so ``d >= 1`` voxel and the rounded voxel is always
   background), in a uniformly random direction around the medial point. If the slice has no
   background voxel at that distance (image too small) the nearest available distance in
   ``[r, drift_max r]`` is used, then any background voxel; a slice that is all foreground keeps a
   centerline click.
4. **Displacement.** Every other click is the medial point plus an isotropic in-plane Gaussian
   offset with standard deviation ``displacement * r`` voxels per in-plane axis. Such a click may
   leave the structure; it is still a ``"centerline"`` click (``inside`` says where it landed).
5. **Spurious clicks.** Each prompted slice gets ``Poisson(spurious_per_slice)`` extra clicks drawn
   uniformly in the 2D bounding box of the slice's foreground grown by ``2 r`` on every side; they
   may land inside or outside the structure.
6. **Bounds.** Clicks lie exactly on the integer slice plane ``t`` along ``axis``; their in-plane
   (row, col) coordinates are continuous and are clipped to the image extent ``[0, size - 1]``
   (voxel centres). Only in-plane coordinates are ever clipped.

Randomness comes from ``numpy.random.default_rng`` streams spawned from ``seed``: the same mask,
axis, level and seed always give the same prompts. Each noise source draws from its own stream
and, except for the spurious clicks, draws the same numbers whatever the level, so for one seed
the levels are nested (the slices missing at ``mild`` are also missing at ``moderate``, and so on)
and offsets scale with the level along the same directions: comparisons between levels are not
blurred by unrelated random draws.

Coordinates: ``mask`` is a (k, j, i) array as SimpleITK gives it; ``axis`` is an array axis
(0 = k, 1 = j, 2 = i); slice ``t`` is ``np.take(mask, t, axis)`` and its (row, col) are the
remaining array axes in order. Output points are (i, j, k) voxel coordinates.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from ..core.errors import InputError
from ..core.prompts import from_ijk, to_voxels, write_markups
from ..core.volume import ijk_to_physical
from .data import structure_slices

KINDS = ("centerline", "drift", "spurious")


@dataclass(frozen=True)
class NoiseLevel:
    """One reader's sloppiness; see the module docstring for the exact model."""

    every_kth: int  # the reader clicks on every k-th slice of the structure (plus the last one)
    displacement: float  # std of the in-plane Gaussian offset per axis, as a fraction of the local radius
    drift_fraction: float  # fraction of the reader's clicks placed 1..3 local radii outside the mask
    missing_fraction: float  # fraction of the scheduled slices left without any click (never first/last)
    spurious_per_slice: float  # expected extra random clicks per prompted slice (Poisson)
    drift_max: float = 3.0  # a drift click lands 1..drift_max local radii outside the mask
    missing_run: int = 1  # missing slices come in runs of this many consecutive scheduled slices

    def __post_init__(self):
        if int(self.every_kth) != self.every_kth or self.every_kth < 1:
            raise InputError(f"every_kth must be a positive integer, not {self.every_kth!r}.")
        for name in ("displacement", "spurious_per_slice"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, not {getattr(self, name)!r}.")
        for name in ("drift_fraction", "missing_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be between 0 and 1, not {getattr(self, name)!r}.")
        if not np.isfinite(self.drift_max) or self.drift_max < 1.0:
            raise InputError(f"drift_max must be >= 1 (local radii), not {self.drift_max!r}.")
        if int(self.missing_run) != self.missing_run or self.missing_run < 1:
            raise InputError(f"missing_run must be a positive integer, not {self.missing_run!r}.")


LEVELS: Dict[str, NoiseLevel] = {
    "clean": NoiseLevel(every_kth=1, displacement=0.0, drift_fraction=0.0, missing_fraction=0.0,
                        spurious_per_slice=0.0),
    "mild": NoiseLevel(every_kth=1, displacement=0.25, drift_fraction=0.05, missing_fraction=0.10,
                       spurious_per_slice=0.05),
    "moderate": NoiseLevel(every_kth=1, displacement=0.5, drift_fraction=0.15, missing_fraction=0.25,
                           spurious_per_slice=0.10),
    "severe": NoiseLevel(every_kth=1, displacement=0.8, drift_fraction=0.30, missing_fraction=0.40,
                         spurious_per_slice=0.20),
    # beyond the four benchmark levels: clicks that drift further and skip runs of slices (docs/noise_model.md)
    "harsh": NoiseLevel(every_kth=1, displacement=1.0, drift_fraction=0.40, missing_fraction=0.50,
                        spurious_per_slice=0.30, drift_max=5.0, missing_run=4),
}

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class SimulatedPrompts:
    """Simulated clicks, ordered by slice; within a slice the reader's click comes first."""

    ijk: np.ndarray  # (N, 3) float voxel coordinates (i, j, k): reversed array order
    labels: np.ndarray  # (N,) int, all 1: readers click foreground
    kind: np.ndarray  # (N,) str: "centerline", "drift" or "spurious" (ground truth of each click)
    inside: np.ndarray  # (N,) bool: the rounded voxel of the click is foreground
    axis: int  # the slicing (array) axis the reader scrolled along
    level: str
    seed: int

    def __len__(self) -> int:
        return int(len(self.ijk))

    @property
    def slice_index(self) -> np.ndarray:
        """(N,) int: the slice t of each click along ``axis`` (ijk is reversed array order)."""
        return np.rint(self.ijk[:, 2 - self.axis]).astype(int)

    def voxel_prompts(self, volume, keep: Optional[np.ndarray] = None):
        """The clicks (all, or those where ``keep`` is True) as ``prompts.VoxelPrompts`` on ``volume`` (the
        grid of the simulated label), slicing along :attr:`axis`: what ``pipeline.segment`` takes."""
        keep = np.ones(len(self), bool) if keep is None else np.asarray(keep, bool)
        return to_voxels(from_ijk(self.ijk[keep], self.labels[keep]), volume, axis=self.axis)

    def to_markups(self, path: Union[str, os.PathLike], ijk_to_lps: np.ndarray) -> Path:
        """Write a Slicer point list (``.mrk.json``, LPS millimetres); ``description`` is the kind."""
        lps = ijk_to_physical(self.ijk, np.asarray(ijk_to_lps, float)) if len(self) else np.zeros((0, 3))
        return write_markups(path, lps, descriptions=[str(k) for k in self.kind], color=(0.4, 1.0, 1.0),
                             node_name="simulated clicks", locked=False)


# ---------------------------------------------------------------- geometry of the structure

def _check_mask(mask: np.ndarray, axis: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"The label has {mask.ndim} dimensions {tuple(mask.shape)}; a 3D label is needed.")
    if axis not in (0, 1, 2):
        raise InputError(f"The slicing axis must be an array axis 0, 1 or 2, not {axis!r}.")
    mask = mask > 0
    if not mask.any():
        raise InputError("label is empty: it has no foreground voxel (label > 0), so there is nothing to click. "
                         "Check the label file and that it belongs to this image.")
    return mask


def _medial(slice2d: np.ndarray) -> Tuple[np.ndarray, float]:
    """Medial point (row, col) and radius of the largest 8-connected component of a 2D mask."""
    labels, count = ndimage.label(slice2d, structure=_EIGHT_CONNECTED)
    if count > 1:
        sizes = np.bincount(labels.ravel())[1:]
        component = labels == (int(np.argmax(sizes)) + 1)  # ties: the lowest label
    else:
        component = labels > 0
    # Pad so that the image border counts as background (a structure cut by the crop has a finite radius).
    dist = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    flat = int(np.argmax(dist))  # ties: the first in C order
    rc = np.array(np.unravel_index(flat, dist.shape), dtype=float)
    return rc, float(dist.flat[flat])


def centerline(mask: np.ndarray, axis: int) -> Dict[int, Tuple[np.ndarray, float]]:
    """Per structure slice ``t`` along ``axis``: (medial point (row, col), local radius in voxels).

    The medial point is the argmax of the 2D Euclidean distance transform of the largest
    8-connected component on that slice (ties: the first in C order; pixels outside the image count
    as background); the local radius is that maximum distance (>= 1 voxel).
    """
    mask = _check_mask(mask, axis)
    return {int(t): _medial(np.take(mask, t, axis=axis)) for t in structure_slices(mask, axis)}


# ---------------------------------------------------------------- simulation

def _resolve_level(level: Union[str, NoiseLevel], every_kth: Optional[int]) -> Tuple[str, NoiseLevel]:
    if isinstance(level, NoiseLevel):
        name, spec = "custom", level
        for key, value in LEVELS.items():
            if value == level:
                name = key
    else:
        if level not in LEVELS:
            raise InputError(f"Unknown noise level {level!r}; choose one of {', '.join(LEVELS)}.")
        name, spec = str(level), LEVELS[level]
    if every_kth is not None:
        spec = dataclasses.replace(spec, every_kth=every_kth)
    return name, spec


def _drift_point(slice2d: np.ndarray, medial_rc: np.ndarray, radius: float, rng: np.random.Generator,
                 drift_max: float = 3.0) -> Optional[np.ndarray]:
    """A background pixel at distance ~U(r, drift_max r) from the slice's foreground, in a random direction."""
    background = ~slice2d
    if not background.any():
        return None
    distance = ndimage.distance_transform_edt(background)  # 0 on foreground, >= 1 on background
    target = rng.uniform(radius, drift_max * radius)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    jitter = rng.uniform(-0.49, 0.49, size=2)  # continuous coordinates; rounds back to the same pixel
    candidates = background & (np.abs(distance - target) <= 0.5)
    if not candidates.any():
        ring = background & (distance >= radius) & (distance <= drift_max * radius)
        if ring.any():
            nearest = np.min(np.abs(distance[ring] - target))
            candidates = ring & (np.abs(np.abs(distance - target) - nearest) <= 1e-9)
        else:
            candidates = background
    rows, cols = np.nonzero(candidates)
    offsets = np.stack([rows - medial_rc[0], cols - medial_rc[1]], axis=1)
    direction = np.array([np.sin(angle), np.cos(angle)])
    norms = np.linalg.norm(offsets, axis=1)
    cosine = (offsets @ direction) / np.maximum(norms, 1e-9)
    best = int(np.argmax(cosine))  # the candidate closest in angle to the drawn direction
    return np.array([rows[best], cols[best]], dtype=float) + jitter


def _missing_runs(order: np.ndarray, count: int, run: int, n_scheduled: int) -> set:
    """``count`` interior scheduled slices to skip: runs of ``run`` consecutive ones starting at the slices of
    ``order`` in turn (a run stops at the last scheduled slice, which is never skipped). With ``run`` 1 these
    are the first ``count`` of ``order``."""
    missing: set = set()
    for start in order:
        for index in range(int(start), min(int(start) + run, n_scheduled - 1)):
            if len(missing) < count:
                missing.add(index)
        if len(missing) >= count:
            break
    return missing


def simulate(mask: np.ndarray, axis: int, level: Union[str, NoiseLevel], seed: int,
             every_kth: Optional[int] = None) -> SimulatedPrompts:
    """Simulate a hurried reader's centerline clicks on ``mask`` (label > 0) along array ``axis``.

    ``level`` is a name in :data:`LEVELS` or a :class:`NoiseLevel`; ``every_kth`` overrides the
    level's. Raises :class:`~SPDSegmentLib.core.errors.InputError` for an empty or non-3D label.
    """
    mask = _check_mask(mask, axis)
    name, spec = _resolve_level(level, every_kth)
    seed = int(seed)
    if seed < 0:
        raise InputError(f"The seed must be a non-negative integer, not {seed}.")
    streams = np.random.SeedSequence(seed).spawn(5)
    s_missing, s_drift, s_disp, s_spurious = (np.random.default_rng(streams[i]) for i in (0, 1, 2, 4))
    row_axis, col_axis = (a for a in range(3) if a != axis)
    height, width = mask.shape[row_axis], mask.shape[col_axis]
    upper = np.array([height - 1, width - 1], dtype=float)

    present = structure_slices(mask, axis)
    positions = list(range(0, len(present), spec.every_kth))
    if positions[-1] != len(present) - 1:
        positions.append(len(present) - 1)
    scheduled = present[positions]
    n_sched = len(scheduled)

    # Every stream draws the same amount whatever the level, so levels are nested for one seed.
    interior = np.arange(1, n_sched - 1)
    missing_order = interior[s_missing.permutation(len(interior))] if len(interior) else interior
    n_missing = min(int(round(spec.missing_fraction * n_sched)), len(interior))
    missing = _missing_runs(missing_order, n_missing, spec.missing_run, n_sched)
    prompted = [i for i in range(n_sched) if i not in missing]

    drift_priority = s_drift.permutation(n_sched)
    n_drift = int(round(spec.drift_fraction * len(prompted)))
    prompted_set = set(prompted)
    drifting = set([int(i) for i in drift_priority if int(i) in prompted_set][:n_drift])

    offsets = s_disp.standard_normal(size=(n_sched, 2))
    # Drift placement: one stream per scheduled slice, so a slice's drift point does not depend on
    # which other slices drift.
    place_rngs = [np.random.default_rng(child) for child in streams[3].spawn(n_sched)]
    spurious_counts = s_spurious.poisson(spec.spurious_per_slice, size=n_sched) if spec.spurious_per_slice > 0 \
        else np.zeros(n_sched, dtype=int)
    spurious_unit = [s_spurious.random(size=(int(c), 2)) for c in spurious_counts]

    rc_list, kinds, ts = [], [], []
    for index in prompted:
        t = int(scheduled[index])
        slice2d = np.take(mask, t, axis=axis)
        medial_rc, radius = _medial(slice2d)
        point = None
        if index in drifting:
            point = _drift_point(slice2d, medial_rc, radius, place_rngs[index], spec.drift_max)
        if point is not None:
            kinds.append("drift")
        else:
            point = medial_rc + spec.displacement * radius * offsets[index]
            kinds.append("centerline")
        rc_list.append(point)
        ts.append(t)
        if spurious_counts[index]:
            rows, cols = np.nonzero(slice2d)
            lo = np.array([rows.min(), cols.min()], float) - 2.0 * radius
            hi = np.array([rows.max(), cols.max()], float) + 2.0 * radius
            lo, hi = np.clip(lo, 0.0, upper), np.clip(hi, 0.0, upper)
            for unit in spurious_unit[index]:
                rc_list.append(lo + unit * (hi - lo))
                kinds.append("spurious")
                ts.append(t)

    rc = np.clip(np.asarray(rc_list, float).reshape(-1, 2), 0.0, upper)
    array_points = np.zeros((len(rc), 3), dtype=float)
    array_points[:, axis] = ts
    array_points[:, row_axis] = rc[:, 0]
    array_points[:, col_axis] = rc[:, 1]
    voxels = np.rint(array_points).astype(int)
    inside = mask[voxels[:, 0], voxels[:, 1], voxels[:, 2]] if len(voxels) else np.zeros(0, bool)
    return SimulatedPrompts(
        ijk=array_points[:, ::-1].copy(),
        labels=np.ones(len(rc), dtype=int),
        kind=np.asarray(kinds, dtype="<U10"),
        inside=np.asarray(inside, dtype=bool),
        axis=int(axis),
        level=name,
        seed=seed,
    )


# ---------------------------------------------------------------- correction clicks

@dataclass(frozen=True)
class CorrectionClick:
    """One simulated correction: where, which kind, and the error it answers."""

    ijk: np.ndarray  # (3,) voxel centre (i, j, k) of the click
    label: int  # 1: a foreground click on a miss; 0: a background click on a false positive
    slice: int  # the slice along the run's axis the click lies on
    error_voxels: int  # size of the 3D error component it was placed in
    depth: float  # in-plane distance from the click to the component's edge, voxels

    @property
    def kind(self) -> str:
        """The point kind of ``prompts.POINT_KINDS``: "correction" (foreground) or "background"."""
        return "correction" if self.label else "background"


def next_correction(label: np.ndarray, mask: np.ndarray, axis: int) -> Optional[CorrectionClick]:
    """The next correction click on ``mask`` against ``label``, by the CVPR 2025 interactive 3D challenge's rule.

    The error is every voxel where ``mask`` and ``label`` (both > 0 as foreground) disagree. Its largest
    26-connected 3D component is the one to correct (ties: the first found in C order). The challenge then
    clicks at the maximum of that component's Euclidean distance transform; a reader clicks in slices, so
    here the transform is taken in the slice planes of ``axis``: on every slice through the component, the
    2D transform of the component's section (the section's edge and the image border count as outside), and
    the click goes where it is largest over all those slices, i.e. at the deepest point of the component's
    thickest section (ties: the lowest slice, then the first pixel in C order). The click is a foreground
    click (label 1) where ``label`` is foreground (a miss), else a background click (a false positive).
    Returns None when ``mask`` equals ``label``.
    """
    label = _check_mask(label, axis)
    mask = np.asarray(mask)
    if mask.shape != label.shape:
        raise InputError(f"The result has shape {mask.shape}, the label {label.shape}: they must be on one grid.")
    error = label != (mask > 0)
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    chosen = int(np.argmax(sizes))
    box = ndimage.find_objects((components == chosen).astype(np.int8))[0]
    component = components[box] == chosen
    best = (-1.0, 0, (0, 0))  # (depth, slice within the box, (row, col))
    for offset in range(component.shape[axis]):
        section = np.take(component, offset, axis=axis)
        if not section.any():
            continue
        depth = ndimage.distance_transform_edt(np.pad(section, 1))[1:-1, 1:-1]
        flat = int(np.argmax(depth))
        if depth.flat[flat] > best[0]:
            best = (float(depth.flat[flat]), offset, np.unravel_index(flat, depth.shape))
    depth, offset, (row, col) = best
    index = [0, 0, 0]
    index[axis] = box[axis].start + offset
    row_axis, col_axis = (a for a in range(3) if a != axis)
    index[row_axis] = box[row_axis].start + int(row)
    index[col_axis] = box[col_axis].start + int(col)
    return CorrectionClick(ijk=np.array(index[::-1], dtype=float), label=int(label[tuple(index)]),
                           slice=int(index[axis]), error_voxels=int(sizes[chosen]), depth=depth)


def with_correction(prompts, click: CorrectionClick):
    """``prompts`` (``prompts.VoxelPrompts``) with ``click`` appended as the newest point, of its kind
    ("correction" or "background"), named ``C-<n>``: clicks accumulate."""
    names = list(prompts.names) if len(prompts.names) == len(prompts) else [""] * len(prompts)
    count = sum(kind != "click" for kind in prompts.kinds) + 1
    return dataclasses.replace(prompts, ijk=np.vstack([prompts.ijk, np.asarray(click.ijk, float)[None]]),
                               labels=np.append(prompts.labels, click.label), names=names + [f"C-{count}"],
                               kinds=list(prompts.kinds) + [click.kind])


__all__ = ["LEVELS", "CorrectionClick", "NoiseLevel", "SimulatedPrompts", "centerline", "next_correction",
           "simulate", "with_correction"]
