"""``spd bench-speed``: the naive slice-by-slice SAM loop against the project's path, side by side.

(a) naive: encode and decode one slice at a time, batch 1, fp32, no cache (what peers do);
(b) ours: ``pipeline.segment`` (only needed slices, batched encoder, batched decoder, cache),
then a re-prompt of the already-encoded volume. Both on the sample case and on a left-atrium case.
"""
from __future__ import annotations

import platform
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive(backbone, volume, axis, slices, prompts_by_slice, intensity):
    from .models.backbone import pad_points
    from .volume import apply_range, get_slice

    shape_hw = tuple(s for a, s in enumerate(volume.shape) if a != axis)
    transform = backbone.transform(*shape_hw)
    t0 = time.perf_counter()
    for t in slices:
        image = apply_range(get_slice(volume.array, axis, t), *intensity)
        with torch.inference_mode():
            emb = backbone.encode(backbone.prepare([image]))
            rc, labels = prompts_by_slice.get(t, (np.array([[shape_hw[0] / 2, shape_hw[1] / 2]]), np.ones(1)))
            points, labs = pad_points([transform.rc_to_model_xy(rc)], [labels])
            low, _ = backbone.decode(emb, points, labs)
            backbone.to_slice(low, *shape_hw)
    return time.perf_counter() - t0


def _throughput(backbone, batch: int, repeats: int = 2):
    device = backbone.device
    images = torch.rand(batch, 3, backbone.input_size, backbone.input_size, device=device)
    with torch.inference_mode():
        backbone.encode(images[:1])  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            emb = backbone.encode(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        encoder = batch * repeats / (time.perf_counter() - t0)
        emb = emb[:1].expand(batch * 4, -1, -1, -1).contiguous()
        points = torch.rand(batch * 4, 2, 2, device=device) * backbone.input_size
        labels = torch.ones(batch * 4, 2, device=device)
        boxes = torch.tensor([[40.0, 40.0, 200.0, 200.0]], device=device).expand(batch * 4, 4)
        backbone.decode(emb[:1], points[:1], labels[:1], boxes[:1])
        t0 = time.perf_counter()
        for _ in range(repeats):
            backbone.decode(emb, points, labels, boxes)
        if device.type == "cuda":
            torch.cuda.synchronize()
        decoder = batch * 4 * repeats / (time.perf_counter() - t0)
    return encoder, decoder


def _case(volume, label, axis, n_slices=30):
    """Sloppy moderate clicks over (up to) n_slices consecutive slices of the structure."""
    from . import prompts as P
    from .simulate import simulate

    sim = simulate(label, axis, "moderate", seed=0)
    t = np.rint(sim.ijk[:, 2 - axis]).astype(int)
    first = int(t.min())
    keep = (t >= first) & (t < first + n_slices)
    return P.to_voxels(P.from_ijk(sim.ijk[keep], sim.labels[keep]), volume, axis=axis)


def run_speed_benchmark(args) -> None:
    from .cache import EmbeddingCache
    from .data import find_cases, load_split
    from .pipeline import SegmentOptions, load_model, segment
    from .volume import intensity_range, read, read_label

    model = load_model(args.model, device=args.device)
    backbone = model.backbone if hasattr(model, "head") else model
    cases = [("hippocampus_001 (sample)", read(SAMPLE / "hippocampus_001_image.nii.gz"), 1)]
    cases[0] = cases[0] + (read_label(SAMPLE / "hippocampus_001_label.nii.gz", like=cases[0][1]),)
    la_root = Path(args.data_root) / "left_atrium"
    if la_root.exists():
        case = find_cases(la_root, load_split("left_atrium")["test"][:1])[0]
        volume, label = case.load()
        cases.append((case.name, volume, 0, label))
    batch = 1 if backbone.device.type == "cpu" else 16  # the pipeline's default (see SegmentOptions)
    encoder_rate, decoder_rate = _throughput(backbone, batch=batch)
    print(f"device {backbone.device}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{platform.machine()}; {date.today()}")
    print(f"encoder {encoder_rate:.2f} slices/s (batch {batch}), decoder {decoder_rate:.1f} prompts/s "
          f"(batch {batch * 4})")
    print(f"{'case':28} {'slices':>6} {'naive s':>8} {'SPD s':>7} {'re-prompt s':>11} {'naive/SPD':>9}")
    for name, volume, axis, label in cases:
        prompts = _case(volume, label, axis)
        slices = sorted(prompts.by_slice())
        intensity = intensity_range(volume.array, "auto")
        naive = _naive(backbone, volume, axis, slices, prompts.by_slice(), intensity)
        cache = EmbeddingCache()
        t0 = time.perf_counter()
        result = segment(volume, prompts, model, SegmentOptions(), cache=cache)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        segment(volume, prompts, model, SegmentOptions(), cache=cache)
        again = time.perf_counter() - t0
        print(f"{name:28} {len(result.slices):>6} {naive:>8.1f} {ours:>7.1f} {again:>11.2f} {naive / ours:>9.2f}")
    print(f"peak resident memory {_peak_rss_mb():.0f} MB")
