"""The correction designs measured for issue 19 (docs/benchmarks.md, "Corrections: the designs measured").

Each design turns the click list (sloppy clicks + corrections) into a mask on top of SPD's own per-slice
probabilities; the corrections come one at a time by the CVPR 2025 interactive challenge's rule
(``simulate.next_correction``), 5 per case, from the moderate sloppy clicks of ``spd evaluate`` (seed
10000 + case index). "shipped" is ``pipeline.segment`` itself (what `spd evaluate --corrections` runs);
the others rebuild the shipped model's steps from the pipeline's own functions and change one thing:

  none             corrections ignored (the start, repeated)
  decoder          the corrected slices re-decoded: the box (stretched to foreground corrections) plus the
                   corrections as positive / negative points, then averaged with the saliency map as shipped
  decoder_alone    the same, the decoder's probability alone on those slices
  dense            as decoder, plus the previous probability as SAM's dense mask prompt
  dense_alone      the same, the decoder alone
  suppress         the saliency component under a background click set to 0 before averaging
  component        the 2D component of the mask under a background click removed, on its slice and 2 slices
                   either side where the mask still holds the point
  end_trim         that component, and every component beyond it towards the nearer end of the mask
  band0, band2     the mask's band as deep as twice the click's depth, near the click (4 x depth), removed
                   (background) or added (foreground), on its slice or 2 slices either side
  field_4_2        the shipped threshold field (core/corrections.py) with sigma 4 mm in-plane, 2 mm across
  field_8_4        sigma 8 mm, 4 mm (what ships)
  field_12_6       sigma 12 mm, 6 mm
  field_adaptive   sigma = the equivalent radius of the mask's section near the click, half that across (where
                   corrections overlap, the one that moves the threshold most wins)
  ball_1           no field; each correction, in click order, sets a ball around itself to its kind, radius = the
                   click's in-plane depth in the mask (background) or outside it (foreground) as it stood before
  field_ball_A[_x2] the field, then those balls with radius A x depth (x2: twice as long across slices)
  centre_K[_nofield][_out]  the field; a background click at least K x as deep in its 2D mask component as
                   that component's deepest point (a click in its middle: the whole section is wrong, as on the
                   slices the mask runs past the structure's end) removes the whole component on its slice
                   (_nofield: that click moves no threshold; _out: also the overlapping components on the slices
                   beyond it, towards the nearer end of the mask)
  threshold_oracle not a design: one threshold for the whole case (0.05 .. 0.95), the best one chosen with the
                   label, the corrections ignored (is the error a bias a global re-calibration could fix?)

Needs the data (--data-root) and encodes what it needs (--cache-dir keeps it). One process, one thread:
``OMP_NUM_THREADS=1 nice -n 10 python scripts/correction_variants.py --dataset hippocampus --cases 10``.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.core import corrections, distill, pipeline  # noqa: E402
from SPDSegmentLib.core.cache import EmbeddingCache  # noqa: E402
from SPDSegmentLib.core.volume import put_slice  # noqa: E402
from SPDSegmentLib.research.data import find_cases, load_split  # noqa: E402
from SPDSegmentLib.research.evaluate import bundled_model_for  # noqa: E402
from SPDSegmentLib.research.metrics import dice_score  # noqa: E402
from SPDSegmentLib.research.simulate import next_correction, simulate, with_correction  # noqa: E402


class Start:
    """SPD as shipped on the sloppy clicks, every intermediate kept: saliency maps, decoded and fused
    probabilities per slice (the steps of ``pipeline.segment``)."""

    def __init__(self, model, volume, prompts, cache):
        self.model, self.volume, self.prompts, self.cache = model, volume, prompts, cache
        p = self.plan = pipeline.plan(volume, prompts, model, pipeline.SegmentOptions())
        self.embeddings = pipeline.encode_slices(p.backbone, volume, p.axis, p.encode, p.intensity, cache=cache,
                                                 batch_size=1, key=p.key)
        pixels = pipeline.slice_pixels(p.backbone, volume.array, p.axis, p.targets, p.intensity)
        self.maps = pipeline.saliency_maps(model, self.embeddings, p.targets, p.shape_hw, pixels=pixels,
                                           cache=cache, key=p.key)
        self.transform = p.backbone.transform(*p.shape_hw)
        jobs, _ = pipeline.spd_jobs(p.by_slice, self.maps, p.targets, self.transform, p.tau, p.neighbours,
                                    decoder_prompt=p.decoder_prompt)
        self.jobs = {job[0]: job for job in jobs}
        self.decoded = self.decode(jobs)
        self.probability = {t: self.fuse(d, self.maps[t]) for t, d in self.decoded.items()}
        self.spacing = pipeline.correction_spacing(volume, p.axis)

    def decode(self, jobs, dense=None):
        p, out = self.plan, {}
        for group in pipeline.prompt_groups(jobs):
            out.update(pipeline._decode(p.backbone, self.embeddings, [jobs[k] for k in group], p.shape_hw,
                                        batch_size=1, progress=None, dense=dense,
                                        cache=None if dense else self.cache, key=p.key))
        return out

    def fuse(self, decoded, saliency):
        return (1 - self.plan.fusion) * np.asarray(decoded, np.float32) + self.plan.fusion * saliency

    def mask(self, slices):
        out = np.zeros(self.volume.shape, np.uint8)
        for t, m in slices.items():
            put_slice(out, self.plan.axis, t, np.asarray(m, bool).astype(np.uint8))
        return out

    def start_slices(self):
        return {t: p > 0.5 for t, p in self.probability.items()}


def _disk(shape, rc, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - rc[0]) ** 2 + (cols - rc[1]) ** 2 <= radius * radius


def _by_slice(fixes, slices, reach=0):
    out = {}
    for fix in fixes:
        for t in range(fix.slice - reach, fix.slice + reach + 1):
            if t in slices:
                out.setdefault(t, []).append(fix)
    return out


def none(start, fixes):
    return start.mask(start.start_slices())


def _redecode(start, t, fixes, dense=None):
    points = np.array([f.rc for f in fixes], float).reshape(-1, 2)
    labels = np.array([f.label for f in fixes])
    job = start.jobs.get(t)
    positives = points[labels == 1]
    box = job[3] if job is not None and not len(positives) else None
    if box is None:
        rc_box = distill.saliency_box(start.maps[t], positives, tau=start.plan.tau)
        lo, hi = rc_box if rc_box is not None else (positives.min(0), positives.max(0))
        if len(positives):
            lo, hi = np.minimum(lo, positives.min(0) - 3), np.maximum(hi, positives.max(0) + 3)
        upper = np.array(start.plan.shape_hw) - 1
        box = start.transform.box_rc_to_model(np.clip(lo, 0, upper), np.clip(hi, 0, upper))
    job = (t, start.transform.rc_to_model_xy(points), labels, box)
    return start.decode([job], dense=dense)[t]


def _dense(start, probability):
    import torch
    import torch.nn.functional as F

    size, (rows, cols) = start.plan.backbone.input_size, start.transform.resized_hw
    p = np.clip(probability, 1e-4, 1 - 1e-4)
    logits = torch.from_numpy(np.log(p / (1 - p)).astype(np.float32))[None, None]
    logits = F.pad(F.interpolate(logits, size=(rows, cols), mode="bilinear", align_corners=False),
                   (0, size - cols, 0, size - rows), value=-20.0)
    return start.plan.backbone.mask_prompt(logits)[0]


def _decoder(start, fixes, fuse=True, dense=False):
    probability = dict(start.probability)
    for t, mine in _by_slice(fixes, probability).items():
        d = _redecode(start, t, mine, dense={t: _dense(start, probability[t])} if dense else None)
        probability[t] = start.fuse(d, start.maps[t]) if fuse else np.asarray(d, np.float32)
    return start.mask({t: p > 0.5 for t, p in probability.items()})


def suppress(start, fixes):
    probability = dict(start.probability)
    for t, mine in _by_slice([f for f in fixes if f.label == 0], probability).items():
        saliency = start.maps[t].copy()
        parts, _ = ndimage.label(saliency > start.plan.tau)
        for fix in mine:
            part = parts[tuple(np.rint(fix.rc).astype(int))]
            if part:
                saliency[parts == part] = 0.0
        probability[t] = start.fuse(start.decoded[t], saliency)
    return start.mask({t: p > 0.5 for t, p in probability.items()})


def component(start, fixes, reach=2):
    slices = start.start_slices()
    for fix in (f for f in fixes if f.label == 0):
        q = tuple(np.rint(fix.rc).astype(int))
        for t in range(fix.slice - reach, fix.slice + reach + 1):
            if t in slices and slices[t][q]:
                parts, _ = ndimage.label(slices[t])
                slices[t] = slices[t] & (parts != parts[q])
    return start.mask(slices)


def end_trim(start, fixes):
    slices = start.start_slices()
    for fix in (f for f in fixes if f.label == 0):
        q = tuple(np.rint(fix.rc).astype(int))
        occupied = sorted(t for t, m in slices.items() if m.any())
        if not occupied or fix.slice not in slices or not slices[fix.slice][q]:
            continue
        parts, _ = ndimage.label(slices[fix.slice])
        footprint = parts == parts[q]
        slices[fix.slice] = slices[fix.slice] & ~footprint
        step = -1 if fix.slice - occupied[0] < occupied[-1] - fix.slice else 1
        t = fix.slice + step
        while t in slices and slices[t].any():
            parts, _ = ndimage.label(slices[t])
            ids = set(np.unique(parts[footprint & slices[t]])) - {0}
            if not ids:
                break
            footprint = np.isin(parts, list(ids))
            slices[t] = slices[t] & ~footprint
            t += step
    return start.mask(slices)


def _region_under(slices, fix):
    """(the click's pixel, the region it corrects on its slice: the mask for a background click, the outside
    for a foreground one), or None when its slice is not segmented or the click is not on such a region."""
    if fix.slice not in slices:
        return None
    q = tuple(np.rint(fix.rc).astype(int))
    region = slices[fix.slice] if fix.label == 0 else ~slices[fix.slice]
    return (q, region) if region[q] else None


def _band(start, fixes, reach):
    slices = start.start_slices()
    for fix in fixes:
        found = _region_under(slices, fix)
        if found is None:
            continue
        q, region = found
        depth = ndimage.distance_transform_edt(np.pad(region, 1, constant_values=bool(fix.label)))[1:-1, 1:-1][q]
        for t in range(fix.slice - reach, fix.slice + reach + 1):
            if t not in slices:
                continue
            here = slices[t] if fix.label == 0 else ~slices[t]
            d = ndimage.distance_transform_edt(np.pad(here, 1, constant_values=bool(fix.label)))[1:-1, 1:-1]
            band = here & (d <= 2 * depth * (1 - abs(t - fix.slice) / (reach + 1))) & \
                _disk(here.shape, fix.rc, max(4.0, 4 * depth))
            slices[t] = (slices[t] & ~band) if fix.label == 0 else (slices[t] | band)
    return start.mask(slices)


def _field(start, fixes, sigma, across):
    thresholds = corrections.threshold_field(start.probability, fixes, *start.spacing, sigma_mm=sigma,
                                             sigma_across_mm=across)
    return start.mask({t: start.probability[t] > thresholds[t] for t in start.probability})


def _local_radius_mm(start, fix) -> float:
    """The equivalent radius of the mask's section holding the click (else the nearest one) on its slice."""
    m = start.probability.get(fix.slice)
    if m is None or not (m > 0.5).any():
        return 5.0
    parts, _ = ndimage.label(m > 0.5)
    q = tuple(np.rint(fix.rc).astype(int))
    part = parts[q]
    if not part:
        _, index = ndimage.distance_transform_edt(parts == 0, return_indices=True)
        part = parts[index[0][q], index[1][q]]
    return float(np.sqrt((parts == part).sum() * np.prod(start.spacing[0]) / np.pi))


def field_adaptive(start, fixes):
    """Each correction with its own sigma; at a voxel the correction that moves the threshold most wins."""
    thresholds = {t: np.full(p.shape, 0.5, np.float32) for t, p in start.probability.items()}
    for fix in fixes:
        sigma = _local_radius_mm(start, fix)
        one = corrections.threshold_field(start.probability, [fix], *start.spacing, sigma_mm=sigma,
                                          sigma_across_mm=sigma / 2)
        for t in one:
            wins = np.abs(one[t] - 0.5) > np.abs(thresholds[t] - 0.5)
            thresholds[t][wins] = one[t][wins]
    return start.mask({t: start.probability[t] > thresholds[t] for t in start.probability})


def _depth_mm(section: np.ndarray, rc, spacing_rc) -> float:
    """The in-plane distance (mm) from the pixel ``rc`` of ``section`` to its nearest pixel outside it."""
    return float(ndimage.distance_transform_edt(np.pad(section, 1), sampling=spacing_rc)[1:-1, 1:-1][rc])


def _balls(start, fixes, alpha: float, across: float = 1.0):
    """In click order, on the mask as it stood: a ball of radius alpha x the click's depth around each
    correction. Returns (slice -> painted value: -1 background, 1 foreground, 0 untouched)."""
    slices = start.start_slices()
    painted = {t: np.zeros(m.shape, np.int8) for t, m in slices.items()}
    spacing_rc, spacing_across = start.spacing
    rows, cols = (np.arange(n, dtype=np.float32) for n in next(iter(slices.values())).shape)
    for fix in fixes:
        found = _region_under(slices, fix)
        if found is None:
            continue
        q, region = found
        radius = alpha * _depth_mm(region, q, spacing_rc)
        d2 = (((rows - fix.rc[0]) * spacing_rc[0]) ** 2)[:, None] + (((cols - fix.rc[1]) * spacing_rc[1]) ** 2)[None, :]
        for t in slices:
            ball = d2 + ((t - fix.slice) * spacing_across / across) ** 2 <= radius ** 2
            slices[t] = np.where(ball, bool(fix.label), slices[t])
            painted[t][ball] = 1 if fix.label else -1
    return painted


def _with_balls(start, fixes, alpha, across=1.0, field=True):
    painted = _balls(start, fixes, alpha, across)
    base = _field(start, fixes, corrections.SIGMA_MM, corrections.SIGMA_ACROSS_MM) if field else none(start, fixes)
    out = {}
    for t in start.probability:
        section = np.take(base, t, axis=start.plan.axis) > 0
        out[t] = np.where(painted[t] == 0, section, painted[t] > 0)
    return start.mask(out)


def _centre(start, fixes, kappa: float, field_too: bool = True, outward: bool = False):
    """The field, plus: a background click in the middle of its 2D mask component removes that component."""
    removed = {}  # index of the click -> {slice: footprint}

    def slices_with(chosen):
        fields = [f for j, f in enumerate(chosen) if field_too or j not in removed]
        thresholds = corrections.threshold_field(start.probability, fields, *start.spacing)
        out = {t: start.probability[t] > thresholds[t] for t in start.probability}
        for j in removed:
            if j < len(chosen):
                for t, footprint in removed[j].items():
                    out[t] = out[t] & ~footprint
        return out

    for index, fix in enumerate(fixes):
        current = slices_with(fixes[:index])  # the mask as it stood when this click came
        if fix.label != 0 or fix.slice not in current:
            continue
        q = tuple(np.rint(fix.rc).astype(int))
        if not current[fix.slice][q]:
            continue
        parts, _ = ndimage.label(current[fix.slice])
        part = parts == parts[q]
        depth = ndimage.distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
        if depth[q] < kappa * depth.max():
            continue
        footprints = {fix.slice: part}
        if outward:
            occupied = sorted(t for t, m in current.items() if m.any())
            step = -1 if fix.slice - occupied[0] < occupied[-1] - fix.slice else 1
            t, footprint = fix.slice + step, part
            while t in current and current[t].any():
                parts, _ = ndimage.label(current[t])
                ids = sorted(set(np.unique(parts[footprint & current[t]])) - {0})
                if not ids:
                    break
                footprint = footprints[t] = np.isin(parts, ids)
                t += step
        removed[index] = footprints
    return start.mask(slices_with(fixes))


def threshold_oracle(start, fixes):
    return max((start.mask({t: p > theta for t, p in start.probability.items()})
                for theta in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)), key=lambda m: dice_score(m, start.label))


# name -> design(start, fixes) -> mask; the names are those of docs/benchmarks.md's table
DESIGNS = {
    "shipped": None,  # pipeline.segment on the whole click list, as the product runs it
    "none": none,
    "decoder": _decoder,
    "decoder_alone": partial(_decoder, fuse=False),
    "dense": partial(_decoder, dense=True),
    "dense_alone": partial(_decoder, fuse=False, dense=True),
    "suppress": suppress,
    "component": component,
    "end_trim": end_trim,
    "band0": partial(_band, reach=0),
    "band2": partial(_band, reach=2),
    "field_4_2": partial(_field, sigma=4.0, across=2.0),
    "field_8_4": partial(_field, sigma=8.0, across=4.0),
    "field_12_6": partial(_field, sigma=12.0, across=6.0),
    "field_adaptive": field_adaptive,
    "ball_1": partial(_with_balls, alpha=1.0, field=False),
    "field_ball_0_75": partial(_with_balls, alpha=0.75),
    "field_ball_1": partial(_with_balls, alpha=1.0),
    "field_ball_1_5": partial(_with_balls, alpha=1.5),
    "field_ball_1_x2": partial(_with_balls, alpha=1.0, across=2.0),
    "centre_0_5": partial(_centre, kappa=0.5),
    "centre_0_7": partial(_centre, kappa=0.7),
    "centre_0_85": partial(_centre, kappa=0.85),
    "centre_0_7_nofield": partial(_centre, kappa=0.7, field_too=False),
    "centre_0_7_out": partial(_centre, kappa=0.7, outward=True),
    "threshold_oracle": threshold_oracle,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--dataset", default="hippocampus")
    parser.add_argument("--cases", type=int, default=10, help="the first N test cases of the split")
    parser.add_argument("--level", default="moderate")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--designs", nargs="*", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--cache-dir", help="embedding cache folder (a second run encodes nothing)")
    args = parser.parse_args(argv)
    split = load_split(args.dataset)
    axis = int(split["axis"])
    model = pipeline.load_model(bundled_model_for(args.dataset))
    cache = EmbeddingCache(max_bytes=4 << 30, directory=args.cache_dir)
    table = {name: [] for name in args.designs}
    for index, case in enumerate(find_cases(Path(args.data_root) / args.dataset, split["test_full"][:args.cases])):
        volume, label = case.load()
        prompts = simulate(label, axis, args.level, seed=10_000 + index).voxel_prompts(volume)
        start = Start(model, volume, prompts, cache)
        start.label = label  # for the threshold oracle only
        for name in args.designs:
            listed, mask = prompts, pipeline.segment(volume, prompts, model, cache=cache).mask
            dice = [dice_score(mask, label)]
            for _ in range(args.clicks):
                click = next_correction(label, mask, axis)
                if click is not None:
                    listed = with_correction(listed, click)
                fixes = corrections.corrections_of(listed)
                mask = pipeline.segment(volume, listed, model, cache=cache).mask if name == "shipped" else \
                    DESIGNS[name](start, fixes)
                dice.append(dice_score(mask, label))
            table[name].append(dice)
            print(f"{case.name} {name:15s} " + " ".join(f"{d:.3f}" for d in dice), flush=True)
    print(f"\n{args.dataset}, {args.cases} cases, {args.level} start, {args.clicks} clicks: mean Dice after each click")
    print("| design | " + " | ".join(str(k) for k in range(args.clicks + 1)) + " |")
    print("|---|" + "---|" * (args.clicks + 1))
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in np.mean(rows, axis=0)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
