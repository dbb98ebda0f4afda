"""Cohorts: one loaded model, many cases; each case all-or-nothing, recorded, and skipped when redone.

- :func:`read_cases` turns a folder (MSD / nnU-Net layout, or images with point files beside them;
  :func:`pair_cases` is the one pairing rule) or a CSV manifest into :class:`Case` objects;
  :func:`shard` keeps job I of N (by a hash of the case name: stable under reordering and additions).
- :class:`Worker` holds a loaded model and runs one case (:meth:`Worker.run`): its segmentation and a
  provenance sidecar (input digests, model identity, settings, output digest) are written together
  (``files.OutputSet``), and a case whose outputs exist and match its inputs, model and settings is
  skipped. Every outcome is a row (:data:`RESULT_COLUMNS`); a failed case never stops the batch.
- :class:`Results` keeps the results CSV, rewritten atomically as rows arrive.
- :func:`run` runs the cases in this process. The engine's ``Batch`` request and the command line use
  it; the cluster layer (``SPDSegmentLib.cluster``) runs the same ``Worker`` on Ray actors.

Imports no torch at module level: reading a manifest and sharding it need none.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import Cancelled, InputError, SPDError
from .files import OutputSet, atomic_write, check_not_inputs, check_space, check_writable, least_output_bytes
from .models.download import sha256_of
from .progress import Progress

log = logging.getLogger("spd.batch")

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
POINT_EXTENSIONS = (".mrk.json", ".json", ".csv", ".tsv", ".fcsv")
IMAGE_FOLDERS = ("images", "imagesTr", "imagesTs")  # MSD / nnU-Net image folders, in the order looked for
POINT_FOLDERS = ("points", "pointsTr", "pointsTs", "clicks")  # where a folder's point files are looked for
OUTPUT_SUFFIX = "_spd.seg.nrrd"  # NAME -> NAME_spd.seg.nrrd
SIDECAR_SUFFIX = ".provenance.json"  # beside each output: what made it (checked on a rerun)
RESULTS_NAME = "results.csv"
RESULT_COLUMNS = ("case", "status", "seconds", "segment_seconds", "axis", "voxels", "warnings", "output",
                  "output_sha256", "error", "worker", "peak_mb")
SIDECAR_FORMAT = "spdsegment-batch-case"
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

# per-case options a manifest may carry: column -> how its text is read ("" keeps the batch's setting)
CASE_OPTIONS = {"axis": str, "mode": str, "tau": float, "neighbours": int, "modality": str, "window": str,
                "slice_range": lambda text: tuple(int(v) for v in re.split(r"[\s,:;]+", text.strip())),
                "empty_slice": str, "decoder_prompt": str, "fusion": float, "components": str,
                "use_box": lambda text: text.strip().lower() in ("1", "true", "yes"), "box_margin_mm": float}
MANIFEST_COLUMNS = ("case", "image", "points", "output") + tuple(CASE_OPTIONS)


@dataclass
class Case:
    """One volume of a batch. Paths are strings (a Case travels to the engine and to cluster workers).

    Attributes:
      name: the case name (letters, digits, ``._+-``; no folder part): the results row and default output.
      image: the image file (NIfTI, NRRD, MHA) or DICOM folder.
      points: the point file (.mrk.json, CSV).
      output: where the segmentation goes (``.seg.nrrd`` or a label map); inside the batch's output folder.
      options: per-case settings (:data:`CASE_OPTIONS`: ``SegmentOptions`` fields and ``axis``).
    """
    name: str
    image: str
    points: str
    output: str
    options: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------- where the cases come from

def check_case_name(name: str) -> str:
    """``name`` if it is a safe file-name stem (it names the output, and must never leave the output
    folder: no folder separators, no ``..``, no leading dot, ASCII letters, digits and ``._+-``)."""
    text = str(name)
    if not CASE_NAME.fullmatch(text) or ".." in text:
        raise InputError(f"The case name {text!r} cannot name an output file: use letters, digits and . _ + - only "
                         "(no folders, no '..', at most 128 characters). In a manifest, give the case a 'case' column "
                         "with such a name.")
    return text


def safe_case_name(text: str) -> str:
    """A valid case name made from any text (a Slicer node name): odd characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._-")[:128].replace("..", "_")
    return name or "case"


def _image_stem(name: str) -> Optional[str]:
    lower = name.lower()
    if lower.endswith(".seg.nrrd") or "_label" in lower:  # earlier outputs and label maps are not inputs
        return None
    return next((name[: -len(e)] for e in IMAGE_EXTENSIONS if lower.endswith(e)), None)


def _visible_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def pair_cases(folder, points_folder=None) -> List[Tuple[str, Path, Path]]:
    """(name, image, points) for each image in ``folder`` with a point file named like it.

    ``CASE.nii.gz`` pairs with ``CASE.mrk.json`` / ``CASE.csv``, or ``CASE_<anything>.mrk.json`` (e.g.
    ``CASE_centerline.mrk.json``), looked for in ``points_folder`` (default: ``folder`` itself). An image
    ``CASE_image.nii.gz`` is the case ``CASE``; nnU-Net's channel files ``CASE_0000.nii.gz`` are the case
    ``CASE`` (other channels are left out). Labels (``*_label*``) and earlier outputs (``*.seg.nrrd``) are
    skipped. Raises InputError when the folder is missing or no image has points.
    """
    folder = Path(folder or "")
    if not folder.is_dir():
        raise InputError(f"Batch input folder {str(folder)!r} does not exist.")
    points_folder = Path(points_folder) if points_folder else folder
    if not points_folder.is_dir():
        raise InputError(f"The point folder {str(points_folder)!r} does not exist.")
    images = {p: _image_stem(p.name) for p in _visible_files(folder)}
    stems = {stem for stem in images.values() if stem}
    points = [p for p in _visible_files(points_folder) if p.name.lower().endswith(POINT_EXTENSIONS)]
    cases, unmatched = [], []
    for image, name in images.items():
        if name is None:
            continue
        channel = re.fullmatch(r"(.+)_(\d{4})", name)
        if channel and f"{channel.group(1)}_0000" in stems:  # nnU-Net: CASE_0000 is the case, _0001... more channels
            if channel.group(2) != "0000":
                continue
            name = channel.group(1)
        stem = name[:-6] if name.endswith("_image") else name
        prefixes = {name + ".", name + "_", stem + ".", stem + "_"}
        if channel:
            prefixes |= {channel.group(0) + ".", channel.group(0) + "_"}
        match = [p for p in points if p.name.startswith(tuple(prefixes))]
        if match:
            cases.append((stem, image, match[0]))
        else:
            unmatched.append(image.name)
    if not cases:
        raise InputError(f"No image in {folder} has a point file named like it (CASE.nii.gz + CASE.mrk.json"
                         + (f" in {points_folder}" if points_folder != folder else "") + ")"
                         + (f"; images without points: {unmatched[:5]}" if unmatched else "") + ".")
    return cases


def default_output(output_folder, name: str) -> str:
    return str(Path(output_folder) / f"{name}{OUTPUT_SUFFIX}")


def cases_from_folder(folder, output_folder, points_folder=None) -> List[Case]:
    """The cases of a folder: MSD / nnU-Net (``imagesTr/`` or ``images/`` with ``points/``, ``pointsTr/``
    or ``clicks/`` beside it, or ``points_folder``), or images with their point files in one folder."""
    folder = Path(folder)
    images = next((folder / n for n in IMAGE_FOLDERS if (folder / n).is_dir()), folder)
    if points_folder is None and images != folder:
        points_folder = next((folder / n for n in POINT_FOLDERS if (folder / n).is_dir()), None)
        if points_folder is None:
            raise InputError(f"{folder} has {images.name}/ but no point folder ({', '.join(POINT_FOLDERS)}): put each "
                             "case's clicks there as CASE.mrk.json, or name the folder with the points option.",
                             setting="points")
    return [Case(name, str(image), str(points), default_output(output_folder, name))
            for name, image, points in pair_cases(images, points_folder)]


def read_manifest(path, output_folder) -> List[Case]:
    """The cases of a CSV manifest: columns ``image`` and ``points`` (paths relative to the manifest's
    folder), optionally ``case`` (default: the image's name), ``output`` (relative to ``output_folder``;
    default ``CASE_spd.seg.nrrd``) and per-case settings (:data:`CASE_OPTIONS`; an empty cell keeps the
    batch's). A malformed manifest (unknown or missing columns, an unreadable value, a repeated case or
    output) raises InputError before any work; a case that cannot run is refused when it runs."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            header = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"Cannot read the manifest {path}: {exc}.") from None
    if not rows:
        raise InputError(f"The manifest {path} has no cases: give a header line (image,points[,case,output,...]) and "
                         "one line per case.")
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    missing = [c for c in ("image", "points") if c not in header]
    if unknown or missing:
        raise InputError(f"The manifest {path}: " + (f"unknown columns {unknown}; " if unknown else "")
                         + (f"missing columns {missing}; " if missing else "")
                         + f"the columns are {', '.join(MANIFEST_COLUMNS)}.")
    base = path.parent
    cases = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row["image"] or not row["points"]:
            raise InputError(f"The manifest {path}, line {line}: give both an image and a points file.")
        image = base / row["image"]
        name = row.get("case") or (_image_stem(image.name) or image.name.split(".")[0])
        output = str(Path(output_folder) / row["output"]) if row.get("output") else default_output(output_folder, name)
        options = {}
        for column, parse in CASE_OPTIONS.items():
            if row.get(column):
                try:
                    options[column] = parse(row[column])
                except ValueError:
                    raise InputError(f"The manifest {path}, line {line}: {column} {row[column]!r} is not a valid "
                                     "value.") from None
        cases.append(Case(name, str(image), str(base / row["points"]), output, options))
    check_unique(cases, path)
    return cases


def check_unique(cases: Sequence[Case], where) -> None:
    for what, key in (("case name", lambda c: c.name), ("output", lambda c: os.path.abspath(c.output))):
        seen = set()
        for case in cases:
            if key(case) in seen:
                raise InputError(f"{where}: the {what} {key(case)!r} appears twice; every case needs its own.")
            seen.add(key(case))


def read_cases(source, output_folder, points_folder=None) -> List[Case]:
    """A folder (:func:`cases_from_folder`) or a ``.csv`` manifest (:func:`read_manifest`)."""
    source = Path(source)
    if source.is_file() and source.name.lower().endswith((".csv", ".tsv")):
        return read_manifest(source, output_folder)
    if not source.exists():
        raise InputError(f"The batch input {source} does not exist: give a folder (imagesTr/ + points/, or images with "
                         "their point files) or a CSV manifest.")
    cases = cases_from_folder(source, output_folder, points_folder)
    check_unique(cases, source)
    return cases


def cases_from_tuples(items: Iterable, output_folder) -> List[Case]:
    """Cases from ``Case`` objects or (name, image, points[, output]) tuples (the engine's ``Batch``)."""
    cases = []
    for item in items:
        if isinstance(item, Case):
            cases.append(item)
        else:
            name, image, points, *output = [str(v) for v in item]
            cases.append(Case(name, image, points, output[0] if output else default_output(output_folder, name)))
    return cases


def parse_shard(text: str) -> Tuple[int, int]:
    """``"I/N"`` -> (I, N), 0 <= I < N (a job array's task id and its size)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise InputError(f"The shard {text!r} is not I/N with 0 <= I < N (e.g. 0/4 ... 3/4; with SLURM: "
                         "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT and --array=0-3).", setting="shard")
    return int(match.group(1)), int(match.group(2))


def shard_of(name: str, count: int) -> int:
    """The shard of a case: a hash of its name, so it does not depend on the order or the other cases."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % count


def shard(cases: Sequence[Case], index: int, count: int) -> List[Case]:
    """The cases of shard ``index`` of ``count`` (every case is in exactly one shard)."""
    return [case for case in cases if shard_of(case.name, count) == index]


# ---------------------------------------------------------------- what made an output

def sidecar_path(output) -> Path:
    """``OUT/NAME_spd.seg.nrrd`` -> ``OUT/NAME_spd.provenance.json``."""
    output = Path(output)
    stem = next((output.name[: -len(e)] for e in (".seg.nrrd",) + IMAGE_EXTENSIONS if output.name.lower().endswith(e)),
                output.name)
    return output.with_name(stem + SIDECAR_SUFFIX)


def input_digest(path) -> str:
    """SHA-256 of a file, or of a folder's files (a DICOM series: names and contents, in order)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Input not found: {path}")
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode("utf-8") + b"\0" + bytes.fromhex(sha256_of(item)))
    return digest.hexdigest()


def model_identity(model) -> dict:
    """What decides the masks besides the inputs: the model's name and digest, its backbone (weights and
    precision), the runtime and the device."""
    backbone = getattr(model, "backbone", model)
    header = getattr(model, "header", None) or {}
    return {"model": getattr(model, "name", backbone.name),
            "digest": header.get("content_sha256") or header.get("weights_sha") or (backbone.checksum or ""),
            "backbone": backbone.identity, "runtime": backbone.runtime_name, "device": str(backbone.device)}


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def case_key(inputs: dict, model: dict, settings: dict) -> str:
    """The digest a finished case is known by: a changed input, model or setting changes it."""
    return hashlib.sha256(_canonical({"inputs": inputs, "model": model, "settings": settings}).encode()).hexdigest()


def finished_record(case: Case, key: str) -> Optional[dict]:
    """The sidecar of ``case`` when its output is complete and was made from the same inputs, model and
    settings (same key, output digest as recorded); else None (the case runs)."""
    sidecar = sidecar_path(case.output)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT or record.get("key") != key:
        return None
    output = Path(case.output)
    try:
        complete = output.is_file() and sha256_of(output) == record.get("output", {}).get("sha256")
    except OSError:
        complete = False
    return record if complete else None


def remove_leftovers(path) -> None:
    """Temporary files a killed run left beside ``path`` (``files.temporary_name``: ``.KIND-...-NAME``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for item in path.parent.glob(f".*-{path.name}"):
        if item.name.startswith((".output-", ".partial-", ".previous-")):
            try:
                item.unlink()
            except OSError:
                pass


# ---------------------------------------------------------------- one worker, one case at a time

def _peak_mb() -> float:
    """This process's peak resident memory in MiB (0 where the platform does not say)."""
    try:
        import resource  # POSIX only: Slicer on Windows has no such module
    except ImportError:
        import psutil

        return round(getattr(psutil.Process().memory_info(), "peak_wset", 0) / 2 ** 20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


@dataclass
class Settings:
    """What a batch runs with, besides the model: ``SegmentOptions``, the slicing axis, the segment's name
    and whether an implausible result fails its case."""
    options: object = None  # pipeline.SegmentOptions; None: the defaults
    axis: object = None  # None: from the clicks (prompts.choose_axis), or a name / array axis
    segment_name: Optional[str] = None  # None: the case name
    strict: bool = False


class Worker:
    """A loaded model and its own embedding cache (emptied after each case, so memory stays flat).

    ``Worker(model, settings).run(case)`` -> one results row. The command line, the engine and each
    cluster actor hold one.
    """

    def __init__(self, model, settings: Optional[Settings] = None, cache=None):
        from .cache import EmbeddingCache

        self.model = model
        self.settings = settings or Settings()
        self.identity = model_identity(model)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    @classmethod
    def load(cls, model_name: str, device: str = "auto", runtime: str = "auto", precision: str = "auto",
             settings: Optional[Settings] = None) -> "Worker":
        from .pipeline import load_model

        return cls(load_model(model_name, device=device, runtime=runtime, precision=precision), settings)

    def case_settings(self, case: Case) -> Tuple[object, object, dict]:
        """(checked SegmentOptions, axis, the settings as recorded) of ``case``: the batch's, with the case's own."""
        from .pipeline import SegmentOptions

        overrides = dict(case.options or {})
        axis = overrides.pop("axis", self.settings.axis)
        unknown = sorted(set(overrides) - set(CASE_OPTIONS))
        if unknown:
            raise InputError(f"Unknown case settings {unknown}; the known ones are {', '.join(CASE_OPTIONS)}.")
        options = dataclasses.replace(self.settings.options or SegmentOptions(), **overrides,
                                      return_saliency=False).validate()
        recorded = {"options": dataclasses.asdict(options), "axis": None if axis in (None, "", "auto") else str(axis),
                    "segment_name": self.settings.segment_name, "strict": bool(self.settings.strict),
                    "output": Path(case.output).name}
        return options, (None if axis in ("", "auto") else axis), recorded

    def run(self, case: Case, progress: Optional[Progress] = None, output_folder=None) -> dict:
        """Run ``case`` unless its outputs are already complete; one results row, never an exception for a
        case that cannot be done (``Cancelled`` and ``KeyboardInterrupt`` pass). ``output_folder``: the
        folder the output must stay in (checked; the engine and the command line give it)."""
        started = time.perf_counter()
        row = {"case": case.name, "status": "failed", "output": case.output, "worker": self.name}
        try:
            check_case_name(case.name)
            check_output(case, output_folder)
            options, axis, recorded = self.case_settings(case)
            inputs = {"image": input_digest(case.image), "points": input_digest(case.points)}
            key = case_key(inputs, self.identity, recorded)
            record = finished_record(case, key)
            if record is not None:
                row.update(record.get("result", {}), status="skipped", output_sha256=record["output"]["sha256"])
                return row
            row.update(self._segment(case, options, axis, inputs, recorded, key, progress, started))
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad case is a failed row; the batch goes on
            row["error"] = str(exc) if isinstance(exc, SPDError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (SPDError, OSError)):
                log.exception("case %s failed", case.name)
        finally:
            self.cache.clear()
            row.setdefault("seconds", round(time.perf_counter() - started, 3))
            row["peak_mb"] = _peak_mb()
            for column in RESULT_COLUMNS:
                row.setdefault(column, "")
        return row

    def _segment(self, case: Case, options, axis, inputs: dict, recorded: dict, key: str,
                 progress: Optional[Progress], started: float) -> dict:
        from . import prompts, volume
        from .pipeline import segment, trained_axes

        image = volume.read(case.image)
        points = prompts.read(case.points)
        voxels = math.prod(image.shape)  # the mask and its provenance record, before the work
        check_space({Path(case.output).parent: least_output_bytes("mask", voxels) + 4096}, f"the outputs of {case.name}")
        voxel_prompts = prompts.to_voxels(points, image, axis=axis, preferred_axes=trained_axes(self.model, image))
        quiet = progress.child() if progress is not None else None  # cancellable, but the bar stays the batch's
        result = segment(image, voxel_prompts, self.model, options, progress=quiet, cache=self.cache)
        warnings = list(result.warnings)
        if len(voxel_prompts.outside_lps):
            warnings.insert(0, f"{len(voxel_prompts.outside_lps)} of {len(points)} points lie outside the image and "
                               "were dropped")
        if self.settings.strict and warnings:
            raise InputError("the result looks implausible (strict): " + " | ".join(warnings) + "; nothing was written.")
        remove_leftovers(case.output)
        remove_leftovers(sidecar_path(case.output))
        summary = {"axis": int(result.axis), "voxels": result.voxels, "warnings": " | ".join(warnings),
                   "segment_seconds": round(result.timings.get("total_s", 0.0), 3)}
        method = "SPD" if result.mode == "spd" else "raw"
        try:
            with OutputSet() as files:  # the mask and its record appear together, or neither
                mask_file = files.add(case.output)
                volume.write_segmentation(mask_file, result.mask, image.ijk_to_lps,
                                          segment_name=self.settings.segment_name or case.name, method=method)
                digest = sha256_of(mask_file)
                summary["seconds"] = round(time.perf_counter() - started, 3)
                record = {"format": SIDECAR_FORMAT, "version": 1, "case": case.name, "key": key,
                          "inputs": {k: {"path": str(getattr(case, k)), "sha256": v} for k, v in inputs.items()},
                          "model": self.identity, "settings": recorded,
                          "output": {"path": Path(case.output).name, "sha256": digest}, "result": summary,
                          "software": {"spdsegment": _version()},
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                files.add(sidecar_path(case.output)).write_text(json.dumps(record, indent=1), encoding="utf-8")
        except (OSError, RuntimeError) as exc:  # disk full, a folder removed meanwhile, ITK write errors
            raise InputError(f"Could not write the outputs of {case.name} ({str(exc).strip().splitlines()[-1][:200]}); "
                             "nothing was written.") from exc
        summary.update(status="done", output_sha256=digest)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        return summary


def _version() -> str:
    from .. import __version__

    return __version__


def check_output(case: Case, output_folder=None) -> None:
    """The output must be a segmentation or label-map file inside ``output_folder`` (when given), never an input."""
    from .volume import LABEL_SUFFIXES, SEGMENTATION_SUFFIXES, output_type_error

    output = Path(case.output)
    problem = output_type_error(output, SEGMENTATION_SUFFIXES + LABEL_SUFFIXES, "output")
    if problem:
        raise InputError(problem)
    if output_folder is not None:
        folder = Path(output_folder).resolve()
        if folder not in output.resolve().parents:
            raise InputError(f"The output {case.output} of {case.name} is outside the output folder {folder}; outputs "
                             "stay inside it (give a relative path without '..').")
    check_not_inputs({f"output of {case.name}": output, f"provenance record of {case.name}": sidecar_path(output)},
                     (case.image, case.points))


# ---------------------------------------------------------------- the results table

class Results:
    """The results CSV: one row per case of this run (:data:`RESULT_COLUMNS`), in the cases' order.

    Rewritten whole through ``files.atomic_write``, so a crash leaves the previous complete table, never a
    half-written one; at most every ``interval`` seconds while rows arrive, and at :meth:`close`.
    """

    def __init__(self, path, cases: Sequence[Case] = (), interval: float = 2.0):
        self.path = Path(path)
        self.order = {case.name: index for index, case in enumerate(cases)}
        self.rows: Dict[str, dict] = {}
        self.interval = interval
        self._written = 0.0
        remove_leftovers(self.path)

    def add(self, row: dict) -> None:
        self.rows[row["case"]] = row
        if time.monotonic() - self._written >= self.interval:
            self.write()

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: (self.order.get(r["case"], len(self.order)), r["case"]))
        with atomic_write(self.path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        self._written = time.monotonic()

    def close(self) -> None:
        self.write()

    def counts(self) -> Dict[str, int]:
        counts = {"done": 0, "skipped": 0, "failed": 0}
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


def default_results_path(output_folder, shard_spec: Optional[Tuple[int, int]] = None) -> Path:
    """``OUT/results.csv``; one file per shard (``results-shard-I-of-N.csv``), so shards never share one."""
    if shard_spec is None:
        return Path(output_folder) / RESULTS_NAME
    return Path(output_folder) / f"results-shard-{shard_spec[0]}-of-{shard_spec[1]}.csv"


def prepare_output_folder(output_folder) -> Path:
    """The output folder, created and checked writable before any model loads."""
    if not output_folder:
        raise InputError("Choose an output folder for the batch.", setting="output")
    folder = Path(output_folder)
    check_writable(folder / RESULTS_NAME, what="batch output folder's results file")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run(worker: Worker, cases: Sequence[Case], output_folder, results_path=None,
        progress: Optional[Progress] = None) -> List[dict]:
    """Every case through ``worker`` in this process; the results CSV kept as rows arrive.

    Returns the rows in the cases' order. ``progress`` gets ("batch", done, total) per case; cancelling
    stops before the next case (the finished ones stay, the results CSV says which).
    """
    progress = progress or Progress()
    folder = prepare_output_folder(output_folder)
    results = Results(results_path or default_results_path(folder), cases)
    try:
        for index, case in enumerate(cases):
            progress.step("batch", index, len(cases))
            results.add(worker.run(case, progress, output_folder=folder))
        progress.step("batch", len(cases), len(cases))
    finally:
        results.close()
    return [results.rows[c.name] for c in cases if c.name in results.rows]


def summary_line(rows: Sequence[dict], seconds: float, results_path) -> str:
    """``batch: 98 done, 0 skipped, 2 failed in 812 s (434 cases/h); results: OUT/results.csv``"""
    counts = {status: sum(r["status"] == status for r in rows) for status in ("done", "skipped", "failed")}
    rate = f" ({3600.0 * counts['done'] / seconds:.0f} cases/h)" if counts["done"] and seconds > 0 else ""
    return (f"batch: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed in {seconds:.0f} s"
            f"{rate}; results: {results_path}")
