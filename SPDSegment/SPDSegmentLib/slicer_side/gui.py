"""What the two Slicer GUIs (the SPDSegment module and the SPD effect) share, without Qt.

The SPD engine of this Slicer process (:func:`engine`), the model menu built from the registry,
each model's own tau and n, the kinds of clicks and the slice numbers users see, progress and status
lines, and the training and batch helpers (a batch's cases come from ``core.batch``). Widgets are passed
in and used through their Python attributes only, so nothing here imports qt, and importing this module
imports no torch.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import List, Optional, Tuple

from ..core.errors import InputError
from ..core.prompts import POINT_KINDS, kind_of_description  # noqa: F401 (the effect reads kinds through gui)
from . import adapter

_engine = None


def engine():
    """The one engine client of this Slicer process, started with Slicer's Python on first use and
    stopped when Slicer quits. Starting it returns at once; the engine loads in the background. Its
    environment is read at each start (SPD's settings as they are then: ``adapter.engine_environment``),
    and closing the scene makes it drop that scene's volumes (:func:`forget_scene_data`)."""
    global _engine
    if _engine is None:
        from ..core.models.download import cache_dir
        from ..engine.client import EngineClient

        adapter.use_slicer_cache_folder()
        _engine = EngineClient(python=adapter.slicer_python(), env=adapter.engine_environment,
                               log_folder=cache_dir() / "logs")
        adapter.on_application_exit(_engine.stop)
        adapter.on_scene_closed(forget_scene_data)
        adapter.on_application_exit(adapter.stop_watching_scenes)
    return _engine


def engine_if_started():
    """The engine client if something has used it, else None (nothing is started)."""
    return _engine


_local = None


def local_engine():
    """The engine's work done in this process, for the synchronous console API (``logic.run``): the same
    request types, models loaded once. The GUIs never use it: they use :func:`engine`."""
    global _local
    if _local is None:
        from ..engine.server import Engine

        _local = Engine()
        adapter.on_scene_closed(forget_scene_data)
    return _local


_scene_listeners: List = []


def when_scene_closes(callback) -> None:
    """Have ``callback()`` run when the scene is closed, after the engine has dropped its volumes: the
    module and the effect drop their own copies (previews, volumes they hold) there."""
    if callback not in _scene_listeners:
        _scene_listeners.append(callback)


def forget_scene_data() -> None:
    """The scene was closed: the engine (and the in-process one) forget its volumes and cached slices, the
    shared volume files are removed, and every :func:`when_scene_closes` listener drops its own copies."""
    adapter.forget_volumes()
    if _engine is not None:
        _engine.forget_volumes()
    if _local is not None:
        _local.forget()
    for callback in list(_scene_listeners):
        callback()


# ---------------------------------------------------------------- models

def spd_header(path) -> dict:
    """An SPD model file's JSON header, read without torch (safetensors: 8-byte length, JSON)."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        if not 0 < length < 1 << 24:
            raise ValueError("not a safetensors file")
        metadata = json.loads(handle.read(length)).get("__metadata__") or {}
    return json.loads(metadata.get("spd_header", "{}"))


def _spd_model_path(name: str) -> Optional[Path]:
    from ..core.models.registry import BUNDLED_SPD_MODELS

    if name in BUNDLED_SPD_MODELS:
        return Path(BUNDLED_SPD_MODELS[name])
    return Path(name).expanduser() if name.endswith(".safetensors") else None


def model_choices() -> List[Tuple[str, str]]:
    """(name, title) of the model menu: every bundled SPD model (default first), then the catalogue."""
    from ..core.models.registry import BUNDLED_SPD_MODELS, DEFAULT_MODEL, catalogue

    spd = sorted(BUNDLED_SPD_MODELS, key=lambda n: (n != DEFAULT_MODEL, n))
    return [(n, f"{n} (SPD model, bundled)") for n in spd] + [(n, e["title"]) for n, e in catalogue().items()]


def fill_model_menu(combo) -> None:
    combo.clear()
    for name, title in model_choices():
        combo.addItem(title, name)


TAU_RANGE, NEIGHBOURS_RANGE = (0.01, 0.99), (0, 10)  # the GUIs' tau slider and neighbour-slice spin box
_HEADERS: dict = {}  # (path, size, mtime) -> header: the effect asks on every parameter change


def model_header(name_or_path: str) -> Optional[dict]:
    """An SPD model's header (bundled name or file), read without torch; None for a plain backbone or an
    unreadable file. ``pipeline.trained_axes`` takes it, so the GUIs choose the slicing axis without torch.
    A file is read again only when its size or time changes (a model retrained under the same name)."""
    from ..core.models.registry import DEFAULT_MODEL

    path = _spd_model_path(name_or_path or DEFAULT_MODEL)
    if path is None:
        return None
    try:
        status = path.stat()
        key = (str(path), status.st_size, status.st_mtime_ns)
        if key not in _HEADERS:
            _HEADERS[key] = spd_header(path)
        return _HEADERS[key]
    except (OSError, ValueError):
        return None


def model_defaults(name_or_path: str) -> Optional[Tuple[float, int]]:
    """An SPD model's own (tau, neighbours); None for a plain backbone (raw mode) or an unreadable file."""
    from ..core.distill import DEFAULT_NEIGHBOURS, DEFAULT_TAU

    header = model_header(name_or_path)
    if header is None:
        return None
    return float(header.get("tau", DEFAULT_TAU)), int(header.get("neighbours", DEFAULT_NEIGHBOURS))


def model_status(name: str) -> str:
    from ..core.models import registry

    if name in registry.BUNDLED_SPD_MODELS:
        return "SPD model bundled with the extension."
    if name not in registry.catalogue():
        return "A local model file."
    entry = registry.catalogue()[name]
    size = f" ({entry['size_bytes'] / 1e6:.0f} MB)" if entry.get("size_bytes") else ""
    if registry.is_available(name):
        state = "on this machine"
    elif entry["source"] == "url" and not registry.downloadable(name):
        state = f"no published checksum, so not downloaded here: get {entry['url']} yourself and choose it as Model file"
    else:
        state = f"not downloaded{size}"
    return f"{state}; licence {entry['licence']}"


# ---------------------------------------------------------------- clicks and slices

# What a click is, by its markups description: the core's rule (prompts.kind_of_description; the point list holds
# every click; "background" is a background click, "correction" a trusted foreground correction, anything else a
# sloppy click). Clicks placed after the first Preview are corrections.
CLICK, CORRECTION, BACKGROUND = POINT_KINDS


def click_kind(background: bool, after_preview: bool) -> str:
    """The kind of a new click: background (always a correction), a foreground correction once a Preview was
    shown for its point list, else a sloppy click."""
    return BACKGROUND if background else CORRECTION if after_preview else CLICK


def click_description(kind: str) -> str:
    """The markups control point description that carries ``kind`` ("" for a plain click)."""
    return "" if kind == CLICK else kind


def clicks_line(kinds, axis_note: str) -> str:
    """The status line after a click: how many clicks of each kind, and the slicing axis with where it came from,
    e.g. "5 clicks (1 background, 2 corrections); axial slices (array axis 0), the slice view ..."."""
    kinds = list(kinds)
    extra = [f"{kinds.count(BACKGROUND)} background"] if BACKGROUND in kinds else []
    extra += [f"{kinds.count(CORRECTION)} correction{'s' * (kinds.count(CORRECTION) != 1)}"] if CORRECTION in kinds \
        else []
    count = f"{len(kinds)} click{'s' * (len(kinds) != 1)}" + (f" ({', '.join(extra)})" if extra else "")
    return f"{count}; {axis_note}." if axis_note else f"{count}."


def slice_letter(axis: int) -> str:
    """The Data Probe's name for the slice number along array axis ``axis``: I, J or K (arrays are (k, j, i)).
    The core's slice numbers along an axis are that IJK index, from 0, as the Data Probe shows them."""
    return "KJI"[int(axis)]


def slice_span(slice_numbers, count: int) -> Tuple[int, int]:
    """(first, last) slice for a new "only slices" range: the clicks' span, else every slice (0 .. count-1)."""
    numbers = [int(t) for t in slice_numbers]
    return (min(numbers), max(numbers)) if numbers else (0, max(int(count) - 1, 0))


# ---------------------------------------------------------------- progress and status lines

def show_progress(bar, handle) -> None:
    stage, done, total = handle.state()
    bar.setMaximum(max(total, 1))
    bar.setValue(min(done, total))
    bar.setFormat(f"{stage}: %p%")


def progress_line(handle, what: str = "Segmenting") -> str:
    """A status line while the engine works: "Updating the preview: encode 3/12..."."""
    stage, done, total = handle.state()
    return f"{what}: {stage} {min(done, total)}/{total}..." if stage and total else f"{what}..."


def error_line(exc: BaseException) -> str:
    """One line for the status label; an SPD error's message already says what to do."""
    from ..core.errors import SPDError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, SPDError) else f"{type(exc).__name__}: {text}"


def summary(result) -> str:
    """``Result.summary()`` (mode, slices, voxels, the prompt audit), then the slicing axis and any warnings."""
    parts = [result.summary() + "."]
    note = getattr(result, "axis_note", "")
    if note:
        parts.append(str(note).rstrip(".") + ".")
    parts += [f"Warning: {w}" for w in getattr(result, "warnings", None) or []]
    return " ".join(parts)


# ---------------------------------------------------------------- training and batches (files only)

def batch_cases(inputs, output_folder):
    """The cases of a batch (``core.batch.Case``) for the engine: ``inputs`` is a folder (MSD / nnU-Net, or
    images with their point files: ``core.batch.read_cases``, the one pairing rule), a CSV manifest, or a
    list of (volume node, point list node) pairs. Nodes are written once into ``OUTPUT/inputs/`` (the
    volume as NRRD, the clicks as .mrk.json), so the engine reads files as for any other batch and a rerun
    skips what is done."""
    from ..core import batch, prompts, volume

    if isinstance(inputs, (str, Path)):
        return batch.read_cases(inputs, output_folder)
    if not output_folder:
        raise InputError("Choose an output folder for the batch.")
    folder = Path(output_folder) / "inputs"
    cases = []
    for volume_node, markups_node in inputs:
        name = batch.safe_case_name(volume_node.GetName())
        image = adapter.volume_from_node(volume_node)
        points = adapter.points_from_markups(markups_node)
        image_path, points_path = folder / f"{name}.nrrd", folder / f"{name}.mrk.json"
        volume.write_image(image_path, image.array, image.ijk_to_lps)
        prompts.write_markups(points_path, points.lps, labels=points.labels)
        cases.append(batch.Case(name, str(image_path), str(points_path), batch.default_output(output_folder, name)))
    batch.check_unique(cases, "The volumes of the batch")
    return cases


def batch_summary(rows) -> str:
    """One line: each case's outcome for a few cases, else the counts and the first failures."""
    def outcome(row):
        return "failed: " + row["error"] if row["status"] == "failed" else row["status"]

    if len(rows) <= 10:
        return "Batch: " + "; ".join(f"{r['case']} {outcome(r)}" for r in rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    failed = [f"{r['case']}: {r['error']}" for r in rows if r["status"] == "failed"][:3]
    return (f"Batch: {counts['done']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed"
            + (" (" + "; ".join(failed) + ")" if failed else "") + "; the output folder's results.csv lists every case.")


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
