"""``spd bench-speed``: the naive slice-by-slice SAM loop against the project's path, side by side.

(a) naive: eager PyTorch fp32, encode and decode one slice at a time, batch 1, no cache (what peers do);
(b) ours: ``pipeline.segment`` with the default runtime (OpenVINO bf16 on a CPU that has it; only the
needed slices; embedding, saliency and decode caches), then two re-prompts of the encoded volume:
one click dragged (the usual edit) and every click replaced (the worst case); and the Segment Editor
effect's path: clicks arrive one per second while ``runner.RunAhead`` works, Preview is pressed at
once after the last click or a second later, and the Preview is timed. Both on the sample case and on
a left-atrium case.
"""
from __future__ import annotations

import platform
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive(backbone, volume, axis, slices, prompts_by_slice, intensity):
    from ..core.models.backbone import pad_points
    from ..core.volume import apply_range, get_slice

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


def _case(volume, label, axis, n_slices=30, seed=0, within=None):
    """Sloppy moderate clicks over (up to) n_slices consecutive slices of the structure."""
    from .simulate import simulate

    sim = simulate(label, axis, "moderate", seed=seed)
    t = np.rint(sim.ijk[:, 2 - axis]).astype(int)
    first = int(t.min())
    keep = (t >= first) & (t < first + n_slices)
    if within is not None:
        keep &= np.isin(t, within)
    return sim.voxel_prompts(volume, keep)


def _one_click_moved(prompts):
    """The same clicks with the middle one dragged by two voxels within its slice."""
    import dataclasses

    ijk = prompts.ijk.copy()
    ijk[len(ijk) // 2, (3 - prompts.axis) % 3] += 2.0
    return dataclasses.replace(prompts, ijk=ijk)


def _clicked_one_per_second(volume, prompts, model, preview_after: float, seconds_per_click: float = 1.0) -> float:
    """The Segment Editor effect's path: clicks arrive one at a time while ``RunAhead`` works, then
    Preview, ``preview_after`` seconds after the last click. Returns the seconds the Preview takes."""
    import dataclasses

    from ..core.cache import EmbeddingCache
    from ..core.pipeline import SegmentOptions, segment
    from ..slicer_side.runner import RunAhead

    cache = EmbeddingCache()
    ahead = RunAhead(cache)
    order = np.argsort(prompts.slice_index(), kind="stable")  # a reader scrolls through the slices
    for count in range(1, len(order) + 1):
        keep = order[:count]
        names = [prompts.names[i] for i in keep] if prompts.names else []
        ahead.request(volume, dataclasses.replace(prompts, ijk=prompts.ijk[keep], labels=prompts.labels[keep],
                                                  names=names), model, SegmentOptions())
        time.sleep(seconds_per_click if count < len(order) else preview_after)
    ahead.stop()  # Preview pressed
    _, seconds = _timed(segment, volume, prompts, model, SegmentOptions(), cache=cache)
    return seconds


def _timed(function, *args, **kwargs):
    t0 = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - t0


def run_speed_benchmark(args) -> None:
    from ..core.cache import EmbeddingCache
    from ..core.pipeline import SegmentOptions, default_batch_size, load_model, segment
    from ..core.sample import sample_case
    from ..core.volume import intensity_range, read, read_label
    from .data import find_cases, load_split

    # (a) what peers do: eager PyTorch fp32; (b) this project's default path (or the one asked for)
    naive_model = load_model(args.model, device=args.device, runtime="torch", precision="fp32")
    naive_backbone = naive_model.backbone if hasattr(naive_model, "head") else naive_model
    model, load_s = _timed(load_model, args.model, device=args.device, runtime=args.runtime, precision=args.precision)
    backbone = model.backbone if hasattr(model, "head") else model
    sample = sample_case()
    sample_volume = read(sample.image)
    cases = [(f"{sample.name} (sample)", sample_volume, sample.axis, read_label(sample.label, like=sample_volume))]
    la_root = Path(args.data_root) / "left_atrium"
    if la_root.exists():
        case = find_cases(la_root, load_split("left_atrium")["test"][:1])[0]
        volume, label = case.load()
        cases.append((case.name, volume, 0, label))
    batch = default_batch_size(backbone.device)
    print(f"device {backbone.device}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{platform.machine()}; {date.today()}")
    print(f"(a) naive: torch-fp32, batch 1, no cache; (b) SPD: {backbone.runtime_name}, batch {batch}, "
          f"model load {load_s:.1f} s (includes the one-time OpenVINO conversion when not cached)")
    for label_, bb, b in (("(a)", naive_backbone, 1), ("(b)", backbone, batch)):
        encoder_rate, decoder_rate = _throughput(bb, batch=b)
        print(f"{label_} encoder {encoder_rate:.2f} slices/s (batch {b}), decoder {decoder_rate:.1f} prompts/s "
              f"(batch {b * 4})")
    print(f"{'case':28} {'slices':>6} {'naive s':>8} {'SPD s':>7} {'naive/SPD':>9} {'1 click moved s':>15} "
          f"{'all clicks new s':>16} {'Preview at once s':>17} {'Preview 1 s later s':>19}")
    for name, volume, axis, label in cases:
        prompts = _case(volume, label, axis)
        slices = sorted(prompts.by_slice())
        intensity = intensity_range(volume.array, "auto")
        naive = _naive(naive_backbone, volume, axis, slices, prompts.by_slice(), intensity)
        cache = EmbeddingCache()
        result, ours = _timed(segment, volume, prompts, model, SegmentOptions(), cache=cache)
        _, moved = _timed(segment, volume, _one_click_moved(prompts), model, SegmentOptions(), cache=cache)
        others = _case(volume, label, axis, seed=1, within=slices)
        _, new = _timed(segment, volume, others, model, SegmentOptions(), cache=cache)
        at_once = _clicked_one_per_second(volume, prompts, model, preview_after=0.0)
        later = _clicked_one_per_second(volume, prompts, model, preview_after=1.0)
        print(f"{name:28} {len(result.slices):>6} {naive:>8.1f} {ours:>7.1f} {naive / ours:>9.2f} {moved:>15.2f} "
              f"{new:>16.2f} {at_once:>17.2f} {later:>19.2f}")
        print("    SPD first run: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    print(f"peak resident memory {_peak_rss_mb():.0f} MB")
