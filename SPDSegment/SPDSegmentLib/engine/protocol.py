"""What the Slicer process and the SPD engine say to each other.

Requests are the dataclasses below; the same types serve every front end (the engine process, and
:class:`~SPDSegmentLib.engine.server.Engine` called in-process by the console API and the benchmark).

On the wire each message is one line of JSON (UTF-8) on the engine's private pipes (its stdin and
the duplicate of its stdout it keeps for itself), with a request id on everything that concerns a
request:

- parent -> engine: ``{"type": "hello", "token": ...}`` first (the token the parent put in the
  engine's environment), then ``{"type": "request", "id": 7, "kind": "segment", "body": {...}}``,
  ``{"type": "cancel", "id": 7}``, ``{"type": "shutdown"}``;
- engine -> parent: ``{"type": "ready", "pid": ...}``, ``{"type": "progress", "id": 7, "stage":
  "encode", "done": 3, "total": 20}``, then exactly one of ``{"type": "result", "id": 7, "body":
  {...}}``, ``{"type": "error", "id": 7, "error": "InputError", "message": ...}`` or
  ``{"type": "cancelled", "id": 7}``.

Voxel arrays never travel in JSON: a volume is written once into a ``.npy`` file in the parent's
private folder and the engine maps it read-only (``{"__volume__": {"id", "path", ...}}``); masks
and saliency maps come back the same way, cropped to their non-zero box. Small arrays (click
coordinates) travel inline. Importing this module imports no torch.

The engine trusts nothing it reads (:func:`from_json` with ``confine``): a file reference must name a
file in its private folder, an array's type must be numeric and its size must fit in memory, and the
only files it deletes are the protocol's own temporary arrays there. A line is at most
:data:`MAX_LINE_BYTES` long; :func:`check_request` refuses fields of the wrong type, naming them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from numpy.lib import format as npy_format

from ..core.files import atomic_write

PROTOCOL_VERSION = 1
TOKEN_ENV = "SPDSEGMENT_ENGINE_TOKEN"  # the parent's secret; the engine removes it from its environment
# The progress stage of a Segment (Preview) that must first encode slices the work ahead had not reached (a
# busy machine, or a click far from the others): the GUIs show it, e.g. "catching up (encoding): 40%".
CATCHING_UP_STAGE = "catching up (encoding)"
SHARE_ENV = "SPDSEGMENT_ENGINE_SHARE"  # the parent's private folder for arrays
INLINE_BYTES = 1 << 14  # arrays up to this size (click coordinates) travel inside the JSON
MAX_LINE_BYTES = 16 << 20  # a longer line is refused: requests are small (voxels travel by file)
ARRAY_FILE = re.compile(r"a\d+-\d+\.npy")  # the temporary array files to_json writes (the reader removes them)
VOLUME_FILE = re.compile(r"volume-[0-9a-f]+\.npy")  # the parent's volumes (mapped; never removed by the engine)


# ---------------------------------------------------------------- requests (one type per job)

@dataclasses.dataclass
class LoadModel:
    """Load (and on first use convert) a model. ``allow_download``: fetch a missing checkpoint, with
    progress; never set it unless the user asked for the download."""
    model: Optional[str] = None  # name, path; None is the default SPD model
    device: str = "auto"
    allow_download: bool = False


@dataclasses.dataclass
class Segment:
    """One run (the effect's Preview, the module's Segment). Returns a ``pipeline.Result``."""
    volume: Any  # core.volume.Volume
    prompts: Any  # core.prompts.VoxelPrompts
    model: Optional[str] = None
    options: Any = None  # core.pipeline.SegmentOptions; None: the defaults (the model's own tau and n)
    device: str = "auto"
    allow_download: bool = False


@dataclasses.dataclass
class EncodeAhead(Segment):
    """Work ahead of a Preview while the user clicks: encode the slices the run will need (nearest the
    newest click first), then run it so saliency maps and decoded slices are remembered. Any newer
    request supersedes it (it stops at the next slice). Returns ``{"encoded": n, "ran": bool}``."""


@dataclasses.dataclass
class Batch:
    """Files in, files out (``core.batch``): ``OUT/NAME_spd.seg.nrrd`` per case, cases already done skipped,
    ``OUT/results.csv``. Returns one row per case (``batch.RESULT_COLUMNS``)."""
    cases: List[Any]  # core.batch.Case, or (name, image path, points path)
    output_folder: str
    model: Optional[str] = None
    options: Any = None
    device: str = "auto"
    axis: Any = None  # the slicing axis of every case; None: from each case's clicks


@dataclasses.dataclass
class Status:
    """What the engine holds: models, cache, device. Answered at once, even while a job runs."""


REQUESTS = {"load_model": LoadModel, "segment": Segment, "encode_ahead": EncodeAhead, "batch": Batch,
            "status": Status}
KIND_OF = {cls: kind for kind, cls in REQUESTS.items()}


# ---------------------------------------------------------------- framing

def dumps(message: dict) -> bytes:
    return (json.dumps(message, separators=(",", ":"), allow_nan=True) + "\n").encode("utf-8")


def loads(line: bytes) -> dict:
    message = json.loads(line.decode("utf-8"))
    if not isinstance(message, dict) or "type" not in message:
        raise ValueError("not a protocol message")
    return message


class LineBuffer:
    """Bytes in (as they arrive, in any pieces), whole messages out. A line longer than ``max_line`` bytes is
    dropped as it arrives (never held in memory) and reported as ``None`` by :meth:`lines`."""

    def __init__(self, max_line: int = MAX_LINE_BYTES):
        self._pending = b""
        self._max_line = max_line
        self._skipping = False  # inside a line that was too long: drop bytes up to its end

    def feed(self, data: bytes) -> List[dict]:
        """The messages completed by ``data``; ValueError for a line that is not a message (or too long)."""
        out = []
        for line in self.lines(data):
            if line is None:
                raise ValueError(f"a message longer than {self._max_line} bytes")
            out.append(loads(line))
        return out

    def lines(self, data: bytes) -> List[Optional[bytes]]:
        """The non-empty lines completed by ``data``; ``None`` for each line that was too long."""
        out: List[Optional[bytes]] = []
        self._pending += data
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                if len(self._pending) > self._max_line:
                    self._pending, self._skipping = b"", True
                return out
            line, self._pending = self._pending[:end], self._pending[end + 1:]
            if self._skipping or len(line) > self._max_line:
                self._skipping = False
                out.append(None)
            elif line.strip():
                out.append(line)


# ---------------------------------------------------------------- arrays through files

def write_array(folder, array: np.ndarray, stem: str) -> dict:
    """``array`` into ``folder/stem.npy`` (``files.atomic_write``: a temporary name, flushed, read back, renamed)."""
    path = Path(folder) / f"{stem}.npy"
    with atomic_write(path) as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
    return {"path": str(path), "dtype": str(array.dtype), "shape": list(array.shape)}


def map_array(ref: dict, confine=None) -> np.ndarray:
    """A read-only view of a written array (memory-mapped, not read into memory); with ``confine`` (a folder)
    the file must be one of the parent's volume files in it."""
    path = confined(ref["path"], confine, VOLUME_FILE) if confine is not None else ref["path"]
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if list(array.shape) != list(ref["shape"]) or str(array.dtype) != ref["dtype"]:
        raise ValueError(f"{ref['path']} does not hold the announced array")
    return array


def confined(path, folder, pattern) -> str:
    """``path`` if it names a regular file directly in ``folder`` (links resolved) whose name matches
    ``pattern``; InputError otherwise: the engine reads no other file."""
    from ..core.errors import InputError

    real, base = os.path.realpath(str(path)), os.path.realpath(str(folder))
    if os.path.dirname(real) != base or not pattern.fullmatch(os.path.basename(real)) or not os.path.isfile(real):
        raise InputError(f"The engine reads only its own files in its private folder; {str(path)[:200]!r} is not "
                         "one of them. Nothing was read.")
    return real


def nonzero_box(array: np.ndarray) -> Optional[List[int]]:
    """[lo0, hi0, lo1, hi1, ...] (hi exclusive) of the non-zero voxels; None if there are none."""
    box = []
    for axis in range(array.ndim):
        others = tuple(a for a in range(array.ndim) if a != axis)
        hits = np.flatnonzero(np.any(array, axis=others))
        if not len(hits):
            return None
        box += [int(hits[0]), int(hits[-1]) + 1]
    return box


def pack_array(array: np.ndarray, folder=None, stem: str = "") -> dict:
    """An array as JSON: inline when small, else its non-zero box written to ``folder``."""
    array = np.asarray(array)
    if folder is None or array.nbytes <= INLINE_BYTES:
        return {"__array__": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
    box = nonzero_box(array)
    packed = {"__array_box__": box, "dtype": str(array.dtype), "shape": list(array.shape)}
    if box is not None:
        crop = array[tuple(slice(box[2 * a], box[2 * a + 1]) for a in range(array.ndim))]
        packed["file"] = write_array(folder, crop, stem or uuid.uuid4().hex)
    return packed


NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: the only array types that cross the pipe


def _array_layout(packed: dict) -> Tuple[np.dtype, Tuple[int, ...]]:
    """The checked dtype and shape of a packed array: numeric, whole non-negative sizes, fits in memory."""
    try:
        dtype = np.dtype(packed["dtype"])
        shape = tuple(packed["shape"])
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"an array without a usable dtype and shape ({exc})") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise ValueError(f"arrays of type {dtype} cannot cross the pipe")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape) or len(shape) > 8:
        raise ValueError(f"an array of shape {list(shape)[:9]} cannot be made")
    from ..core.volume import available_memory

    size = dtype.itemsize
    for n in shape:
        size *= n
    available = available_memory()
    if available is not None and size > available:
        raise ValueError(f"an array of {size} bytes does not fit in the {available} bytes of memory available")
    return dtype, shape


def unpack_array(packed: dict, confine=None) -> np.ndarray:
    """The array ``pack_array`` made. With ``confine`` (the engine's private folder) a file must be a temporary
    array file in it, and only such a file is removed after reading; without it (the parent reading the
    engine's answers) the file is removed after reading, as its reader owns it."""
    dtype, shape = _array_layout(packed)
    if "__array__" in packed:
        return np.array(packed["__array__"], dtype=dtype).reshape(shape)
    array = np.zeros(shape, dtype)
    box = packed["__array_box__"]
    if box is not None:
        if not isinstance(box, list) or len(box) != 2 * len(shape) or not all(isinstance(v, int) for v in box):
            raise ValueError("an array box that does not fit its array")
        path = packed["file"]["path"]
        if confine is not None:
            path = confined(path, confine, ARRAY_FILE)
        array[tuple(slice(box[2 * a], box[2 * a + 1]) for a in range(array.ndim))] = np.load(path, allow_pickle=False)
        try:
            os.remove(path)  # the reader owns a result file once it has read it
        except OSError:
            pass
    return array


# ---------------------------------------------------------------- values <-> JSON

def _dataclasses() -> Dict[str, type]:
    """The data types that may cross the pipe (an allow-list: nothing else is ever constructed)."""
    from ..core import batch, distill, pipeline, prompts

    types = [pipeline.SegmentOptions, pipeline.Result, distill.AuditEntry, prompts.VoxelPrompts, batch.Case,
             *REQUESTS.values()]
    return {cls.__name__: cls for cls in types}


def to_json(value, folder=None, share_volume: Optional[Callable[[Any], dict]] = None, _names=None):
    """``value`` (requests, results, options, prompts, arrays, volumes) as JSON-ready data.

    Large arrays go to files in ``folder``; a ``core.volume.Volume`` becomes the reference that
    ``share_volume(volume)`` returns. New fields of the dataclasses travel without changes here.
    """
    recurse = lambda v: to_json(v, folder, share_volume, _names)  # noqa: E731
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return pack_array(value, folder, f"a{next(_serial)}-{os.getpid()}")
    if isinstance(value, (list, tuple)):
        items = [recurse(v) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {str(k): recurse(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value).__name__ == "Volume" and share_volume is not None:
        return {"__volume__": share_volume(value)}
    if dataclasses.is_dataclass(value):
        fields = {f.name: recurse(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": type(value).__name__, "fields": fields}
    raise TypeError(f"{type(value).__name__} cannot be sent to the SPD engine")


def from_json(data, open_volume: Optional[Callable[[dict], Any]] = None, _types=None, confine=None):
    """The inverse of :func:`to_json`; ``open_volume(reference)`` turns a volume reference into a Volume.

    ``confine`` (the engine's private folder): array files must lie there (:func:`unpack_array`). Malformed
    data raises ValueError (or the InputError of a file outside the folder)."""
    types = _types if _types is not None else _dataclasses()
    recurse = lambda v: from_json(v, open_volume, types, confine)  # noqa: E731
    if isinstance(data, list):
        return [recurse(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__array__" in data or "__array_box__" in data:
        return unpack_array(data, confine)
    if "__tuple__" in data:
        if not isinstance(data["__tuple__"], list):
            raise ValueError("a malformed tuple")
        return tuple(recurse(v) for v in data["__tuple__"])
    if "__volume__" in data:
        if open_volume is None:
            raise ValueError("a volume reference arrived where none was expected")
        return open_volume(data["__volume__"])
    if "__dataclass__" in data:
        cls = types.get(data["__dataclass__"]) if isinstance(data["__dataclass__"], str) else None
        if cls is None:
            raise ValueError(f"unknown data type {str(data['__dataclass__'])[:80]!r}")
        if not isinstance(data.get("fields"), dict):
            raise ValueError(f"{cls.__name__} without its fields")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            return cls(**{k: recurse(v) for k, v in data["fields"].items() if k in known})
        except TypeError as exc:  # a required field missing
            raise ValueError(f"{cls.__name__}: {exc}") from None
    return {k: recurse(v) for k, v in data.items()}


def check_request(request) -> None:
    """InputError naming the field when a request that came over the pipe holds a value of the wrong type (the
    values themselves are checked by the core, e.g. ``SegmentOptions.validate``)."""
    from ..core.errors import InputError
    from ..core.pipeline import SegmentOptions
    from ..core.prompts import VoxelPrompts
    from ..core.volume import Volume

    expected = {"volume": (Volume,), "prompts": (VoxelPrompts,), "options": (SegmentOptions, type(None)),
                "model": (str, type(None)), "device": (str,), "allow_download": (bool,), "output_folder": (str,),
                "cases": (list, tuple)}
    for item in dataclasses.fields(request):
        value = getattr(request, item.name)
        if item.name in expected and not isinstance(value, expected[item.name]):
            raise InputError(f"The {KIND_OF[type(request)]} request's {item.name} is a {type(value).__name__}, not a "
                             f"{' or '.join(t.__name__ for t in expected[item.name])}; nothing was done.")
    if isinstance(request, Batch) and not all(_is_case(case) for case in request.cases):
        raise InputError("Each case of a batch request is a batch.Case or (name, image path, points path); nothing "
                         "was done.")


def _is_case(case) -> bool:
    """A batch case as it may come over the pipe: a ``core.batch.Case`` of strings, or three strings."""
    from ..core.batch import Case

    if isinstance(case, Case):
        return all(isinstance(getattr(case, f), str) for f in ("name", "image", "points", "output")) and \
            isinstance(case.options, dict)
    return isinstance(case, (list, tuple)) and len(case) == 3 and all(isinstance(v, str) for v in case)


_serial = itertools.count()


# ---------------------------------------------------------------- volumes shared by file

class VolumeShelf:
    """The parent's side: each volume's voxels written once into the private folder, the newest few kept.

    Voxels are known by the identity of their array (the Slicer adapter hands out one read-only view per
    volume node and modification time), so the main thread never hashes voxels; the engine computes the
    content fingerprint. A new volume is written in slabs, a few milliseconds at a time
    (:meth:`write_some`, called from the client's poll), so writing a 600-slice CT never freezes the GUI;
    its reference may be sent only once :meth:`complete`. The geometry travels in the reference, so a
    volume moved by a transform reuses its voxel file.
    """

    SLAB_BYTES = 4 << 20  # one write call (a few ms); the time budget is checked between slabs

    def __init__(self, folder, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep
        self._files: List[dict] = []  # {"array", "id", "ref", "written" (slices), "handle"}, newest last

    def reference(self, volume) -> dict:
        """The reference the engine opens ``volume`` by; its voxel file may still be being written."""
        entry = self._entry(volume.array)
        matrix = np.asarray(volume.ijk_to_lps, float)
        geometry = uuid.uuid5(uuid.NAMESPACE_OID, repr(np.round(matrix, 9).tolist()) + str(volume.name)).hex[:12]
        return {"id": f"{entry['id']}-{geometry}", "array": entry["ref"], "ijk_to_lps": matrix.tolist(),
                "name": volume.name}

    def _entry(self, array) -> dict:
        for index, entry in enumerate(self._files):
            if entry["array"] is array:
                self._files.append(self._files.pop(index))
                if entry["handle"] is not None or Path(entry["ref"]["path"]).exists():
                    return entry
                self._files.pop()  # its file was removed under us: write it again
                break
        file_id = uuid.uuid4().hex
        path = self.folder / f"volume-{file_id}.npy"
        entry = {"array": array, "id": file_id, "written": 0, "handle": None,
                 "ref": {"path": str(path), "dtype": str(array.dtype), "shape": list(array.shape)}}
        self._files.append(entry)
        self._evict()
        return entry

    def _evict(self) -> None:
        """Drop the oldest complete volumes beyond ``keep`` (one still being written stays)."""
        done = [e for e in self._files if e["handle"] is None and e["written"] == len(e["array"])]
        for entry in done[: max(0, len(self._files) - self.keep)]:
            self._files.remove(entry)
            remove_quietly(entry["ref"]["path"])

    def complete(self, reference: dict) -> bool:
        """Whether the voxel file behind ``reference`` is written (its reference may be sent)."""
        path = reference["array"]["path"]
        return not any(e["ref"]["path"] == path and e["written"] < len(e["array"]) for e in self._files)

    @property
    def pending_bytes(self) -> int:
        return sum(int(e["array"][e["written"]:].nbytes) for e in self._files)

    @property
    def total_bytes(self) -> int:
        return sum(int(e["array"].nbytes) for e in self._files if e["written"] < len(e["array"]))

    def write_some(self, budget_s: float = 0.02) -> bool:
        """Write pending voxels for about ``budget_s`` seconds; True when every volume is written."""
        deadline = time.perf_counter() + budget_s
        for entry in self._files:
            while entry["written"] < len(entry["array"]):
                self._write_slab(entry)
                if time.perf_counter() > deadline:
                    return self.pending_bytes == 0
        return True

    def _write_slab(self, entry: dict) -> None:
        array = entry["array"]
        path = Path(entry["ref"]["path"])
        partial = path.with_name(path.stem + ".partial.npy")
        if entry["handle"] is None:
            entry["handle"] = open(partial, "wb")
            npy_format.write_array_header_1_0(entry["handle"], {"descr": npy_format.dtype_to_descr(array.dtype),
                                                                "fortran_order": False, "shape": array.shape})
        slice_bytes = max(1, array[:1].nbytes)
        count = max(1, self.SLAB_BYTES // slice_bytes)
        first = entry["written"]
        slab = np.ascontiguousarray(array[first:first + count])  # a view when the array is contiguous
        entry["handle"].write(memoryview(slab).cast("B"))
        entry["written"] = first + len(slab)
        if entry["written"] == len(array):
            entry["handle"].close()  # no fsync: the engine reads the same pages from the page cache
            entry["handle"] = None
            os.replace(partial, path)

    def clear(self) -> None:
        """Forget every volume and remove its file (also one still being written)."""
        for entry in self._files:
            if entry["handle"] is not None:
                entry["handle"].close()
                path = Path(entry["ref"]["path"])
                remove_quietly(path.with_name(path.stem + ".partial.npy"))
            remove_quietly(entry["ref"]["path"])
        self._files = []


def remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:  # already gone, or still mapped on Windows (the folder goes at stop)
        pass


class VolumeRack:
    """The engine's side: volumes mapped read-only from the parent's files, by id, the newest few kept.
    With ``confine`` (the engine's private folder) only the parent's volume files there are mapped.

    A volume is checked when it is first opened (3D, not empty, no NaN or infinite voxels): here, in the
    engine, so that Slicer's main thread never scans a whole volume.
    """

    def __init__(self, keep: int = 3, confine=None):
        self.keep = keep
        self.confine = confine
        self._rack: Dict[str, Any] = {}

    def open(self, ref: dict):
        from ..core.errors import InputError
        from ..core.volume import Volume, validate_array

        try:
            volume_id = str(ref["id"])
            volume = self._rack.pop(volume_id, None)
            if volume is None:
                array = map_array(ref["array"], self.confine)
                ijk_to_lps = np.array(ref["ijk_to_lps"], float)
                if ijk_to_lps.shape != (4, 4) or not np.isfinite(ijk_to_lps).all():
                    raise ValueError("its geometry is not a finite 4 x 4 matrix")
                name = str(ref.get("name", "volume"))
                array = validate_array(array, what=f"volume {name!r}")
                volume = Volume(array=array, ijk_to_lps=ijk_to_lps, name=name)
        except InputError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"The engine could not read the volume shared with it ({exc}); run again.") from exc
        self._rack[volume_id] = volume
        while len(self._rack) > self.keep:
            self._rack.pop(next(iter(self._rack)))
        return volume

    def clear(self) -> None:
        self._rack.clear()

    def __len__(self) -> int:
        return len(self._rack)
