"""Where the Dice goes: an oracle ladder on the test split, and the store-backed evaluation it shares
with the benchmark.

Rungs (per test case, 3D Dice against the label; clicks from ``simulate`` at the given level):

- ``saliency``: the saliency head alone, thresholded at tau, on the slices SPD segments;
- ``oracle_box``: the (tuned) decoder with the ground-truth box of every structure slice;
- ``oracle_clean``: the decoder with clean centerline clicks and the ground-truth box;
- ``consensus``: the decoder with SPD's consensus prompts only (no prompt for slices CPD leaves empty);
- ``spd``: SPD as shipped (``pipeline.segment`` with default options).

Embeddings come from the feature store (``research/features.py``): each test case's stored slices
are put into an in-memory embedding cache under the key ``pipeline.segment`` computes, so every rung
runs the real inference code without encoding again. The store holds int8 copies of the inference
runtime's embeddings; docs/benchmarks.md reports what that changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..core import pipeline
from ..core.cache import EmbeddingCache
from ..core.volume import get_slice, put_slice
from .data import structure_range
from .features import FeatureEntry
from .simulate import next_correction, simulate

RUNGS = ("saliency", "oracle_box", "oracle_clean", "consensus", "spd")


def prefilled_cache(entry: FeatureEntry, max_bytes: int = 2 << 30) -> EmbeddingCache:
    """An in-memory embedding cache holding one stored case and axis under its inference key."""
    import torch

    cache = EmbeddingCache(max_bytes=max_bytes)
    for t in entry.slices:
        cache.put(entry.meta["key"], t, torch.from_numpy(entry.embedding(t)))
    return cache


def _mask_from(slice_masks: Dict[int, np.ndarray], shape, axis: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for t, m in slice_masks.items():
        put_slice(mask, axis, t, (np.asarray(m, np.float32) > 0.5).astype(np.uint8))
    return mask


def gt_box_jobs(label: np.ndarray, axis: int, transform, clicks_by_slice=None) -> List[tuple]:
    """Decoder jobs with each structure slice's ground-truth box (and, if given, that slice's clicks)."""
    first, last = structure_range(label, axis)
    jobs = []
    for t in range(first, last + 1):
        rows, cols = np.nonzero(get_slice(label, axis, t))
        if not len(rows):
            continue
        box = transform.box_rc_to_model(np.array([rows.min(), cols.min()]), np.array([rows.max(), cols.max()]))
        points, labels = np.zeros((0, 2)), np.zeros(0)
        if clicks_by_slice is not None and t in clicks_by_slice:
            rc, labels = clicks_by_slice[t]
            points = transform.rc_to_model_xy(rc)
        jobs.append((t, points, np.asarray(labels), box))
    return jobs


def run_case(model, volume, label, axis: int, level: str, seed: int, entry: FeatureEntry,
             rungs=RUNGS) -> Dict[str, np.ndarray]:
    """Each rung's 3D mask for one case (see the module docstring)."""
    cache = prefilled_cache(entry)
    prompts = simulate(label, axis, level, seed=seed).voxel_prompts(volume)
    options = pipeline.SegmentOptions()
    plan = pipeline.plan(volume, prompts, model, options)
    if plan.key != entry.meta["key"]:
        raise RuntimeError(f"the store's key of {volume.name} does not match inference's: re-encode it")
    out: Dict[str, np.ndarray] = {}
    if "spd" in rungs:
        out["spd"] = pipeline.segment(volume, prompts, model, options, cache=cache).mask
        if set(rungs) == {"spd"}:
            return out
    embeddings = pipeline.encode_slices(plan.backbone, volume, axis, sorted(entry.slices), plan.intensity,
                                        cache=cache, key=plan.key)
    transform = plan.backbone.transform(*plan.shape_hw)
    pixels = pipeline.slice_pixels(plan.backbone, volume.array, axis, plan.targets, plan.intensity) \
        if getattr(model.head, "uses_image", False) else None
    maps = pipeline.saliency_maps(model, embeddings, plan.targets, plan.shape_hw, pixels=pixels)
    if "saliency" in rungs:
        out["saliency"] = _mask_from({t: maps[t] > plan.tau for t in plan.targets}, volume.shape, axis)
    decode = (lambda jobs: _mask_from(
        {t: m for group in pipeline.prompt_groups(jobs)
         for t, m in pipeline._decode(plan.backbone, embeddings, [jobs[k] for k in group], plan.shape_hw,
                                      batch_size=plan.batch_size, progress=None).items()}, volume.shape, axis))
    if "consensus" in rungs:
        jobs, _ = pipeline.spd_jobs(plan.by_slice, maps, plan.targets, transform, plan.tau, plan.neighbours,
                                    empty_slice="skip")
        out["consensus"] = decode(jobs)
    if "oracle_box" in rungs:
        out["oracle_box"] = decode(gt_box_jobs(label, axis, transform))
    if "oracle_clean" in rungs:
        clean = simulate(label, axis, "clean", seed=seed).voxel_prompts(volume).by_slice()
        out["oracle_clean"] = decode(gt_box_jobs(label, axis, transform, clean))
    return out


def load_store(root: Optional[str]):
    from .features import FeatureStore
    from .train import default_store_root

    return FeatureStore(Path(root) if root else default_store_root())


def oracle_corrections(label: np.ndarray, mask: np.ndarray, axis: int, spacing_kji, radius_mm: float,
                       clicks: int) -> List[np.ndarray]:
    """The correction ladder's top rung: what a perfect correction near each click would give.

    Starting from ``mask``, ``clicks`` times: the challenge's next click (``simulate.next_correction``) on the
    current mask, then every voxel within ``radius_mm`` of it (Euclidean, in mm) set to the label. Returns
    the mask after each click (a method that changes the result only near its clicks cannot do better with
    the same click rule, unless it also mends errors farther away).
    """
    gt = np.asarray(label) > 0
    current = np.asarray(mask) > 0
    spacing = np.asarray(spacing_kji, float)
    reach = np.ceil(radius_mm / spacing).astype(int)
    out = []
    for _ in range(clicks):
        click = next_correction(label, current, axis)
        if click is not None:
            centre = np.rint(click.ijk[::-1]).astype(int)
            lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, gt.shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            offsets = np.ogrid[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, centre))]
            ball = sum((o * s) ** 2 for o, s in zip(offsets, spacing)) <= radius_mm ** 2
            current = current.copy()
            current[box][ball] = gt[box][ball]
        out.append(current.astype(np.uint8))
    return out
