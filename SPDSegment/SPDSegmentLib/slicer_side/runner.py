"""Running SPD off the UI thread, without Qt: a worker thread the GUI polls (e.g. from a QTimer).

Slicer's GUI and MRML belong to the main thread, so a run is three steps: read the nodes on the main
thread (``slicer_adapter.prepare_inputs``), compute here in a worker (:func:`compute`), then write on the
main thread (``slicer_adapter.write_result``) once :attr:`BackgroundRun.done` and only if it succeeded.
Importing this module imports no torch.
"""
from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core.errors import Cancelled, InputError
from ..core.progress import Progress

_MODELS: Dict[Tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(name_or_path: Optional[str] = None, device: str = "auto"):
    """``pipeline.load_model`` once per (model, device) in this process (the GUI runs many previews)."""
    from ..core import pipeline

    key = (str(name_or_path or pipeline.DEFAULT_MODEL), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = pipeline.load_model(key[0], device=device)
        return _MODELS[key]


def _loaded(model, device: str):
    """A loaded model as it is; a name, path or None (the default) through :func:`cached_model`."""
    return cached_model(model, device) if model is None or isinstance(model, str) else model


def forget_models() -> None:
    """Drop the loaded models (and so their GPU memory once nothing else holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def compute(volume, voxel_prompts, model=None, options=None, progress: Optional[Progress] = None,
            device: str = "auto"):
    """Load (cached) and segment: the part of a run that may take minutes. Touches no MRML."""
    from ..core import pipeline
    from ..core.cache import default_cache

    return pipeline.segment(volume, voxel_prompts, _loaded(model, device), options=options, progress=progress,
                            cache=default_cache())


class BackgroundRun:
    """``work(progress)`` in a daemon thread; poll :attr:`done`, :meth:`state`, then :meth:`result`.

    ``cancel()`` sets the Progress flag, so the pipeline stops at its next step and :meth:`result`
    raises ``errors.Cancelled``.
    """

    def __init__(self, work: Callable[[Progress], Any], name: str = "SPD run"):
        self._work = work
        self._lock = threading.Lock()
        self._state: Tuple[str, int, int] = ("starting", 0, 1)
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self.progress = Progress(self._on_progress)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            self._state = (stage, int(done), int(total))

    def _run(self) -> None:
        try:
            self._result = self._work(self.progress)
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc
        finally:
            self.finished_at = time.perf_counter()

    def start(self) -> "BackgroundRun":
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.progress.cancel()

    @property
    def cancelled(self) -> bool:
        return self.progress.cancelled

    @property
    def done(self) -> bool:
        return self.started_at is not None and not self._thread.is_alive()

    def state(self) -> Tuple[str, int, int]:
        """(stage, done, total) of the latest progress report."""
        with self._lock:
            return self._state

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return self.done

    def result(self):
        """The work's return value; re-raises its exception (Cancelled, InputError, ...) here."""
        if not self.done:
            raise RuntimeError("The run has not finished; poll `done` first.")
        if self._error is not None:
            raise self._error
        return self._result


class _SupersededProgress(Progress):
    """Cancels a background run as soon as a newer request (or a stop) supersedes it."""

    def __init__(self, current):
        super().__init__()
        self._current = current

    def check(self) -> None:
        if not self._current():
            self.cancel()
        super().check()


class RunAhead:
    """Do a run's work while the user is still clicking.

    The effect calls :meth:`request` after each click. One daemon worker first encodes the slices
    that ``pipeline.plan`` says the run needs (nearest to the newest click first), then runs the
    whole pipeline for the clicks so far: its saliency maps and decoded slices are remembered in the
    shared cache, so the Preview that follows recalls every slice whose consensus prompt the last
    clicks did not change and decodes only the rest. A newer request replaces the current one;
    :meth:`stop` (a Preview starting) halts it between two slices. Working ahead is only an
    optimisation: its failures are kept in :attr:`last_error`, never raised; the Preview reports
    real problems.
    """

    def __init__(self, cache=None):
        self._cache = cache
        self._lock = threading.Lock()
        self._job: Optional[tuple] = None
        self._generation = 0
        self._thread: Optional[threading.Thread] = None
        self._idle = threading.Event()
        self._idle.set()
        self.encoded = 0  # slices encoded ahead so far
        self.runs = 0  # background runs that finished (their slices are remembered)
        self.last_error: Optional[BaseException] = None

    def request(self, volume, voxel_prompts, model=None, options=None, device: str = "auto") -> None:
        with self._lock:
            self._job = (volume, voxel_prompts, model, options, device)
            self._generation += 1
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="SPD run ahead", daemon=True)
                self._thread.start()

    def preload(self, model=None, device: str = "auto") -> None:
        """Load (and on first use convert) the model in the background, e.g. when the effect is
        selected, so that neither the first click's work nor the first Preview waits for it."""
        self.request(None, None, model, None, device)

    def stop(self) -> None:
        with self._lock:
            self._job = None
            self._generation += 1

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """True once every request so far has been worked off (or stopped)."""
        return self._idle.wait(timeout)

    def _current(self, generation: int) -> bool:
        with self._lock:
            return generation == self._generation

    def _loop(self) -> None:
        while True:
            with self._lock:
                job, generation, self._job = self._job, self._generation, None
                if job is None:
                    self._thread = None
                    self._idle.set()
                    return
            try:
                self._work(job, generation)
            except Cancelled:
                pass  # superseded by a newer click or stopped by a Preview
            except Exception as exc:  # noqa: BLE001 - an optimisation must never break the GUI
                self.last_error = exc

    def _work(self, job: tuple, generation: int) -> None:
        from ..core import pipeline
        from ..core.cache import default_cache

        volume, voxel_prompts, model, options, device = job
        model = _loaded(model, device)
        if voxel_prompts is None:  # preload only
            return
        options = options or pipeline.SegmentOptions()
        plan = pipeline.plan(volume, voxel_prompts, model, options)
        cache = self._cache if self._cache is not None else default_cache()
        newest = int(voxel_prompts.slice_index()[-1])
        for t in sorted(plan.targets, key=lambda s: (abs(s - newest), s)):
            if not self._current(generation):
                return
            if not cache.contains(plan.key, t):
                pipeline.encode_slices(plan.backbone, volume, plan.axis, [t], plan.intensity, cache, None, 1,
                                       key=plan.key)
                self.encoded += 1
        # every slice is encoded: saliency, distillation and decoding are cheap next to that, and
        # what they compute is remembered for the Preview. No saliency volume: the maps are remembered
        # per slice, and a volume-sized array per click would only churn memory on a large CT.
        pipeline.segment(volume, voxel_prompts, model, dataclasses.replace(options, return_saliency=False),
                         progress=_SupersededProgress(lambda: self._current(generation)), cache=cache)
        self.runs += 1


_run_ahead: Optional[RunAhead] = None


def run_ahead() -> RunAhead:
    """The process-wide RunAhead of the Segment Editor effect (uses the default cache)."""
    global _run_ahead
    if _run_ahead is None:
        _run_ahead = RunAhead()
    return _run_ahead


# ---------------------------------------------------------------- batch (files in, files out; no MRML)

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
POINT_EXTENSIONS = (".mrk.json", ".json", ".csv", ".tsv", ".fcsv")


def pair_cases(folder) -> List[Tuple[str, Path, Path]]:
    """(name, image, points) for each image in ``folder`` with a point file named like it.

    ``CASE.nii.gz`` pairs with ``CASE.mrk.json`` / ``CASE.csv``, or ``CASE_<anything>.mrk.json`` (e.g.
    ``CASE_centerline.mrk.json``). Labels (``*_label*``) and earlier outputs (``*.seg.nrrd``) are skipped.
    """
    folder = Path(folder or "")
    if not folder.is_dir():
        raise InputError(f"Batch input folder {str(folder)!r} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    points = [p for p in files if p.name.lower().endswith(POINT_EXTENSIONS)]
    cases, unmatched = [], []
    for image in files:
        lower = image.name.lower()
        if not lower.endswith(IMAGE_EXTENSIONS) or lower.endswith(".seg.nrrd") or "_label" in lower:
            continue
        name = next(image.name[: -len(e)] for e in IMAGE_EXTENSIONS if lower.endswith(e))
        stem = name[:-6] if name.endswith("_image") else name
        match = [p for p in points if p.name.startswith((name + ".", name + "_", stem + ".", stem + "_"))]
        if match:
            cases.append((stem, image, match[0]))
        else:
            unmatched.append(image.name)
    if not cases:
        raise InputError(f"No image in {folder} has a point file named like it (CASE.nii.gz + CASE.mrk.json)"
                         + (f"; images without points: {unmatched[:5]}" if unmatched else "") + ".")
    return cases


def run_batch(cases, output_folder, model=None, options=None, progress: Optional[Progress] = None,
              device: str = "auto") -> List[Dict[str, Any]]:
    """Segment each case and write ``OUT/NAME_spd.seg.nrrd``; one row per case (failures are reported, not
    fatal). Cancellation stops before the next case; finished cases stay written."""
    from ..core import prompts, volume as vol
    from ..core.errors import Cancelled, SPDError
    from ..core.pipeline import trained_axes

    progress = progress or Progress()
    if not output_folder:
        raise InputError("Choose an output folder for the batch.")
    out_dir = Path(output_folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, image_path, points_path) in enumerate(cases):
        progress.step("batch", index, len(cases))
        t0 = time.perf_counter()
        try:
            image = vol.read(image_path)
            voxel_prompts = prompts.to_voxels(prompts.read(points_path), image,
                                              preferred_axes=trained_axes(model, image))
            result = compute(image, voxel_prompts, model, options, progress, device)
            path = vol.write_segmentation(out_dir / f"{name}_spd.seg.nrrd", result.mask, image.ijk_to_lps,
                                          segment_name=name)
            rows.append({"case": name, "output": str(path), "voxels": int(result.mask.sum()), "error": "",
                         "seconds": round(time.perf_counter() - t0, 2)})
        except Cancelled:
            raise
        except (SPDError, OSError, MemoryError) as exc:
            rows.append({"case": name, "output": "", "voxels": 0, "error": str(exc),
                         "seconds": round(time.perf_counter() - t0, 2)})
    progress.step("batch", len(cases), len(cases))
    return rows


# ---------------------------------------------------------------- helpers for the module GUI (no Qt)

def model_choices(default_spd_model: Optional[str] = None) -> List[Tuple[str, str]]:
    """(name, title) for the model menu: the default SPD model, then the backbone catalogue."""
    from ..core import pipeline
    from ..core.models.registry import catalogue

    spd = default_spd_model or pipeline.DEFAULT_MODEL
    return [(spd, f"{spd} (SPD model, bundled)")] + [(n, e["title"]) for n, e in catalogue().items()]


def model_status(name: str) -> str:
    from ..core.models import registry

    if name not in registry.catalogue():
        return "SPD model bundled with the extension."
    entry = registry.catalogue()[name]
    size = f" ({entry['size_bytes'] / 1e6:.0f} MB)" if entry.get("size_bytes") else ""
    state = "on this machine" if registry.is_available(name) else f"not downloaded{size}"
    return f"{state}; licence {entry['licence']}"


def train_arguments(data_folder, output_path, epochs: int = 8, lora: bool = False, device: str = "auto"):
    """Arguments after the Python executable for ``python -m SPDSegmentLib.cli train``."""
    if not data_folder or not output_path:
        raise InputError("Choose a data folder (imagesTr, labelsTr) and an output .spd.safetensors file.")
    return ["-m", "SPDSegmentLib.cli", "train", "--data", str(data_folder), "--out", str(output_path),
            "--stage1-epochs", str(int(epochs)), "--mode", "lora" if lora else "frozen", "--device", device]


def parse_progress(line: str) -> Optional[float]:
    """Fraction done from a tqdm line such as 'stage 1 (saliency):  40%|####  | 40/100 [00:10<00:15]'."""
    match = re.search(r"(\d+)/(\d+)\s*\[", line)
    if not match or int(match.group(2)) == 0:
        return None
    return min(1.0, int(match.group(1)) / int(match.group(2)))
