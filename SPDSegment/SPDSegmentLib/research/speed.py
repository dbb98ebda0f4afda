"""``spd bench-speed``: the naive slice-by-slice SAM loop against the project's path, side by side.

(a) naive: eager PyTorch fp32, encode and decode one slice at a time, batch 1, no cache (what peers do);
(b) ours: ``pipeline.segment`` with the default runtime (OpenVINO bf16 on a CPU that has it; only the
needed slices; embedding, saliency and decode caches), then two re-prompts of the encoded volume:
one click dragged (the usual edit) and every click replaced (the worst case); and the Segment Editor
effect's path: clicks arrive one per second (``--seconds-per-click``) while the SPD engine process
works ahead, Preview is pressed at once after the last click or a second later, and the Preview is
timed from the request to the mask back in this process, then shown as the effect shows it: at the
next tick of its QTimer. The same path in-process (the engine's work ahead in a thread of this process, as the effect
did before the engine) is timed alongside, so the two are compared on the same machine at the same
time. Then corrections: after a first Preview, correction clicks by the CVPR 2025 interactive challenge's rule
(``simulate.next_correction``), each sent as the effect sends it (work ahead, then Preview at once: auto-update)
and timed from the click to the updated mask back here. Both on the sample case and on a left-atrium case.
``--busy N`` keeps N other processes spinning on the CPU meanwhile (2 on this 2-core machine: Slicer's
rendering, or another job), to see how the Preview holds up when the machine is loaded; the correction
rows spin them only while their corrections are timed, after the first Preview.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ..core.cache import EmbeddingCache
from ..core.errors import Cancelled
from ..core.models.backbone import pad_points
from ..core.pipeline import SegmentOptions, default_batch_size, load_model, segment
from ..core.progress import Progress
from ..core.sample import sample_case
from ..core.volume import apply_range, get_slice, intensity_range, read, read_label
from ..engine.client import EngineClient
from ..engine.protocol import EncodeAhead, Segment
from ..engine.server import Engine
from .data import find_cases, load_split
from .simulate import next_correction, simulate, with_correction

POLL_SECONDS = 0.05  # the effect's and the module's QTimer interval (SegmentEditorEffect.py, SPDSegment.py)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _naive(backbone, volume, axis, slices, prompts_by_slice, intensity):
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
    sim = simulate(label, axis, "moderate", seed=seed)
    t = np.rint(sim.ijk[:, 2 - axis]).astype(int)
    first = int(t.min())
    keep = (t >= first) & (t < first + n_slices)
    if within is not None:
        keep &= np.isin(t, within)
    return sim.voxel_prompts(volume, keep)


def _one_click_moved(prompts):
    """The same clicks with the middle one dragged by two voxels within its slice."""
    ijk = prompts.ijk.copy()
    ijk[len(ijk) // 2, (3 - prompts.axis) % 3] += 2.0
    return dataclasses.replace(prompts, ijk=ijk)


def _click_by_click(prompts):
    """The clicks so far after each click, in slice order (as a reader scrolls)."""
    order = np.argsort(prompts.slice_index(), kind="stable")
    for count in range(1, len(order) + 1):
        yield prompts.select(order[:count])


def _wait_polling(seconds: float, client) -> None:
    """Sleep like Slicer's event loop, polling the engine as the effect's QTimer does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(min(POLL_SECONDS, max(0.0, end - time.perf_counter())))
        if client is not None:
            client.poll()


def _at_next_tick(seconds: float) -> float:
    """When the effect shows a Preview that took ``seconds``: its QTimer, restarted by Preview, notices the
    answer at its next tick (the same rule for both paths, so they are compared, not their timers)."""
    return math.ceil(seconds / POLL_SECONDS - 1e-9) * POLL_SECONDS


def _median_of(function, repeats: int = 5) -> float:
    return float(np.median([_timed(function)[1] for _ in range(repeats)]))


def _clicked_one_per_second(volume, prompts, model, preview_after: float, seconds_per_click: float = 1.0,
                            device: str = "auto", client=None):
    """The Segment Editor effect's path through a fresh SPD engine process (``client``: an
    ``EngineClient``, stopped here): the model loaded first (as when the effect is selected), clicks one
    at a time with work ahead after each, then Preview ``preview_after`` seconds after the last click.
    Returns (the seconds from Preview to the mask back in this process, the median seconds of the same
    Preview again: everything remembered, so what is left is the cost of the path itself)."""
    client = client or EngineClient()
    try:
        client.load_model(model, device).wait()
        for clicks in _click_by_click(prompts):
            client.encode_ahead(volume, clicks, model, SegmentOptions(), device)
            _wait_polling(seconds_per_click if len(clicks) < len(prompts) else preview_after, client)

        def preview():
            handle = client.segment(volume, prompts, model, SegmentOptions(), device)
            handle.wait(interval=0.001)
            return handle.result()  # raises what the engine raised

        _, seconds = _timed(preview)
        return seconds, _median_of(preview)
    finally:
        client.stop()


class _InProcessAhead:
    """The former in-process path, for comparison: the engine's work ahead in a thread of this process
    (what the effect's RunAhead did); a newer click supersedes the running one at its next slice."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._job = None
        self._progress = None
        self._thread = None

    def request(self, job) -> None:
        with self._lock:
            self._job = job
            if self._progress is not None:
                self._progress.cancel()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self.request(None)
        thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                job, self._job = self._job, None
                if job is None:
                    self._thread = None
                    return
                progress = self._progress = Progress()
            try:
                self.engine.handle(job, progress)
            except Cancelled:
                pass


def _clicked_in_process(volume, prompts, model, preview_after: float, seconds_per_click: float = 1.0):
    """The same path in-process with a fresh cache (``model``: loaded); Preview stops the work ahead.
    Returns the same two numbers as :func:`_clicked_one_per_second`."""
    engine = Engine(cache=EmbeddingCache())
    ahead = _InProcessAhead(engine)
    for clicks in _click_by_click(prompts):
        ahead.request(EncodeAhead(volume, clicks, model, SegmentOptions()))
        time.sleep(seconds_per_click if len(clicks) < len(prompts) else preview_after)

    def preview():
        return engine.handle(Segment(volume, prompts, model, SegmentOptions()))

    t0 = time.perf_counter()
    ahead.stop()  # Preview pressed
    preview()
    return time.perf_counter() - t0, _median_of(preview)


def _corrected_preview(volume, label, prompts, model_name, clicks: int = 3, device: str = "auto", client=None,
                       busy: int = 0):
    """The effect's correction path through a fresh SPD engine process: the first Preview of ``prompts`` (after
    its work ahead), then ``clicks`` correction clicks by the challenge's rule against the newest Preview, each
    sent as work ahead and followed at once by a Preview (auto-update). The clicks correct the part of the
    structure the reader clicked (the label outside the clicked slices is left out), so a correction needs no
    slice encoded that the first Preview did not. Returns the seconds from each correction click to its mask
    back in this process. ``busy``: that many processes spin on the CPU while the corrections are timed (the
    first Preview runs before they start: a reader corrects a result already on screen)."""
    clicked = prompts.slice_index()
    label = label.copy()
    outside = [t for t in range(label.shape[prompts.axis]) if not clicked.min() <= t <= clicked.max()]
    label[(slice(None),) * prompts.axis + (outside,)] = 0
    client = client or EngineClient()
    try:
        client.load_model(model_name, device).wait()
        client.encode_ahead(volume, prompts, model_name, SegmentOptions(), device)
        handle = client.segment(volume, prompts, model_name, SegmentOptions(), device)
        handle.wait(interval=0.001)
        mask = handle.result().mask
        with busy_processes(busy):
            return _timed_corrections(client, volume, label, prompts, mask, model_name, clicks, device)
    finally:
        client.stop()


def _timed_corrections(client, volume, label, prompts, mask, model_name, clicks, device):
    """Correction clicks against the newest mask, each sent as the effect sends it; seconds to each mask back."""
    seconds = []
    for _ in range(clicks):
        click = next_correction(label, mask, prompts.axis)
        if click is None:
            break
        prompts = with_correction(prompts, click)
        t0 = time.perf_counter()
        client.encode_ahead(volume, prompts, model_name, SegmentOptions(), device)
        handle = client.segment(volume, prompts, model_name, SegmentOptions(), device)
        handle.wait(interval=0.001)
        mask = handle.result().mask
        seconds.append(time.perf_counter() - t0)
    return seconds


@contextmanager
def busy_processes(count: int):
    """``count`` processes spinning on the CPU at normal priority while the block runs (then stopped)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(0, int(count)))]
    try:
        time.sleep(0.5 if spinners else 0.0)  # let them take the cores
        yield spinners
    finally:
        for spinner in spinners:
            spinner.terminate()
        for spinner in spinners:
            spinner.wait()


def _timed(function, *args, **kwargs):
    t0 = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - t0


def _engine_environment(args) -> dict:
    """The engine process uses the runtime and precision asked for here."""
    env = dict(os.environ)
    for name, value in (("SPDSEGMENT_RUNTIME", args.runtime), ("SPDSEGMENT_PRECISION", args.precision)):
        if value and value != "auto":
            env[name] = value
    return env


def _previews(volume, prompts, model, args):
    """The effect's path through the engine and in-process, alternating, so both see the machine alike:
    'at once (in-process)', '1 s later (...)' as the effect shows them (at its next QTimer tick), and
    'again (...)' from the request to the mask, without the tick."""
    pace = getattr(args, "seconds_per_click", 1.0)
    preview = {}
    for after in (0.0, 1.0):
        preview[after] = (
            _clicked_one_per_second(volume, prompts, args.model, after, pace, device=args.device,
                                    client=EngineClient(env=_engine_environment(args))),
            _clicked_in_process(volume, prompts, model, after, pace))
    at_once, later = (f"{_at_next_tick(preview[a][0][0]):.2f} ({_at_next_tick(preview[a][1][0]):.2f})"
                      for a in (0.0, 1.0))
    return at_once, later, f"{preview[1.0][0][1]:.3f} ({preview[1.0][1][1]:.3f})"


def _correction_rows(cases, args) -> None:
    """The correction latency table: click to updated Preview through the engine (median and worst of the
    clicks), as the effect shows it (at its next QTimer tick)."""
    print(f"Correction: from a correction click (work ahead, then Preview at once) to the updated mask in this "
          f"process, through the engine; as the effect shows it (next {POLL_SECONDS * 1000:.0f} ms tick); "
          f"{getattr(args, 'busy', 0)} busy processes while the corrections are timed (not during the first Preview)")
    print(f"{'case':28} {'clicks':>6} {'median s':>9} {'worst s':>8}  per click s")
    for name, volume, axis, label in cases:
        seconds = [_at_next_tick(v) for v in _corrected_preview(
            volume, label, _case(volume, label, axis), args.model, clicks=getattr(args, "correction_clicks", 3),
            device=args.device, client=EngineClient(env=_engine_environment(args)), busy=getattr(args, "busy", 0))]
        print(f"{name:28} {len(seconds):>6} {np.median(seconds):>9.2f} {max(seconds):>8.2f}  " +
              " ".join(f"{v:.2f}" for v in seconds))


def run_speed_benchmark(args) -> None:
    """The rows ``args`` ask for. ``--busy N``: N processes spin while the speed and Preview rows run; the
    correction rows spin their own only while the corrections are timed (a reader corrects a result already
    on screen), never on top of the others."""
    preview_only = getattr(args, "preview_only", False)  # only the effect's Preview columns
    corrections_only = getattr(args, "corrections_only", False)  # only the correction latency
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
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {date.today()}")
    print(f"(b) SPD: {backbone.runtime_name}, batch {batch}, model load {load_s:.1f} s (includes the one-time "
          "OpenVINO conversion when not cached)")
    if not corrections_only:
        with busy_processes(getattr(args, "busy", 0)):
            _speed_rows(model, backbone, batch, cases, args, preview_only)
    _correction_rows(cases, args)
    ending = "" if corrections_only or preview_only else f"peak resident memory {_peak_rss_mb():.0f} MB; "
    print(f"{ending}load average at the end {os.getloadavg()[0]:.1f}")


def _speed_rows(model, backbone, batch, cases, args, preview_only: bool) -> None:
    """The naive loop against the project's path, and the effect's Preview (``preview_only``: the Preview alone)."""
    previews = f"{'Preview at once s':>17} {'Preview 1 s later s':>19} {'Preview again s':>15}"
    preview_title = (f"Preview: through the engine process (in this process for comparison), seconds; a click "
                     f"every {getattr(args, 'seconds_per_click', 1.0):g} s; at once and 1 s later as the effect "
                     f"shows them, at its next {POLL_SECONDS * 1000:.0f} ms QTimer tick; again: without the tick")
    if preview_only:
        print(preview_title)
        print(f"{'case':28} {previews}")
        for name, volume, axis, label in cases:
            print(f"{name:28} " + " ".join(f"{v:>{w}}" for v, w in zip(
                _previews(volume, _case(volume, label, axis), model, args), (17, 19, 15))))
        return
    # (a) what peers do: eager PyTorch fp32; (b) this project's default path (or the one asked for)
    naive_model = load_model(args.model, device=args.device, runtime="torch", precision="fp32")
    naive_backbone = naive_model.backbone if hasattr(naive_model, "head") else naive_model
    print("(a) naive: torch-fp32, batch 1, no cache")
    for label_, bb, b in (("(a)", naive_backbone, 1), ("(b)", backbone, batch)):
        encoder_rate, decoder_rate = _throughput(bb, batch=b)
        print(f"{label_} encoder {encoder_rate:.2f} slices/s (batch {b}), decoder {decoder_rate:.1f} prompts/s "
              f"(batch {b * 4})")
    print(preview_title)
    print(f"{'case':28} {'slices':>6} {'naive s':>8} {'SPD s':>7} {'naive/SPD':>9} {'1 click moved s':>15} "
          f"{'all clicks new s':>16} {previews}")
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
        at_once, later, again = _previews(volume, prompts, model, args)
        print(f"{name:28} {len(result.slices):>6} {naive:>8.1f} {ours:>7.1f} {naive / ours:>9.2f} {moved:>15.2f} "
              f"{new:>16.2f} {at_once:>17} {later:>19} {again:>15}")
        print("    SPD first run: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
