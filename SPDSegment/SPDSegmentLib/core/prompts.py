"""Prompt points: Slicer markups / CSV files -> physical points -> voxels -> prompts per slice.

Frames are named in every variable: ``lps``/``ras`` millimetres, ``ijk`` continuous voxel (i, j, k),
``rc`` (row, col) in a slice. Points outside the image are reported, never clamped onto it.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .files import atomic_write
from .volume import Volume, ijk_to_physical, physical_to_ijk, ras_to_lps, slice_axes

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                  "Schema/markups-schema-v1.0.3.json#")
POINT_TYPES = ("Fiducial", "ClosedCurve", "Curve")
INTEGER_TOLERANCE = 0.05  # voxels: clicks in a slice view lie on the slice plane up to rounding
# choose_axis, when the slice planes do not decide: spreads within 10 % (at least one slice) of the largest are
# close; so are main-direction alignments within 0.1 of the best; a main direction needs the points' largest
# variance to be at least twice the next (a line, not a blob)
SPREAD_CLOSE = 0.10
DIRECTION_CLOSE = 0.10
ELONGATION = 2.0
ANATOMICAL_ORDER = ("axial", "coronal", "sagittal")  # the last resort of a tie
# where a slicing axis came from (VoxelPrompts.axis_source)
AXIS_SOURCES = ("given", "view", "slice planes", "clicks' geometry", "trained orientation", "tie")
EDGE_TOLERANCE = 1e-6  # voxels: a point on the image's outer face still counts as inside
# Column triples a CSV may use, and the frame each implies (x, y, z take the frame from a comment).
CSV_COLUMNS = {("r", "a", "s"): "ras", ("l", "p", "s"): "lps", ("i", "j", "k"): "ijk", ("x", "y", "z"): None}
SLICE_VIEW_NAMES = {"axial": "axial", "red": "axial", "coronal": "coronal", "green": "coronal",
                    "sagittal": "sagittal", "yellow": "sagittal"}
# What each point is (PointSet.kinds, VoxelPrompts.kinds):
#   "click": a sloppy foreground click (label 1): distillation keeps it only where the saliency map agrees;
#   "correction": a foreground correction (label 1): trusted, never rejected; it adds the structure under it;
#   "background": a background click (label 0), always a correction: it removes the wrong region it sits in.
# Markups carry the kind in a point's description ("correction", "background"; anything else is a click);
# CSV files in the label column (1/fg/foreground/positive, correction, 0/bg/background/negative) or in a
# Slicer table's description column.
POINT_KINDS = ("click", "correction", "background")
CORRECTION_KINDS = ("correction", "background")
KIND_OF_WORD = {"fg": "click", "foreground": "click", "positive": "click", "click": "click", "1": "click",
                "correction": "correction", "bg": "background", "background": "background",
                "negative": "background", "0": "background"}
CSV_LABEL_OF_KIND = {"click": "fg", "correction": "correction", "background": "bg"}  # what write_points writes


def kinds_from_labels(labels) -> List[str]:
    """The kinds of points known only by their labels: 1 a click, 0 a background click."""
    return ["click" if int(label) else "background" for label in np.asarray(labels).reshape(-1)]


def _checked_kinds(kinds, labels: np.ndarray, what: str) -> List[str]:
    """``kinds`` as a list (derived from ``labels`` when None), each one of POINT_KINDS and agreeing with its
    label (a background point has label 0, any other label 1). InputError naming ``what`` otherwise."""
    if kinds is None:
        return kinds_from_labels(labels)
    kinds = [str(k) for k in kinds]
    if len(kinds) != len(labels):
        raise InputError(f"{what}: {len(labels)} points but {len(kinds)} kinds; give one per point.")
    unknown = sorted(set(kinds) - set(POINT_KINDS))
    if unknown:
        raise InputError(f"{what}: unknown point kind {unknown[0]!r}; each point is one of {', '.join(POINT_KINDS)}.")
    clash = [i for i, (k, lab) in enumerate(zip(kinds, labels)) if (k == "background") != (int(lab) == 0)]
    if clash:
        raise InputError(f"{what}: point {clash[0] + 1} is a {kinds[clash[0]]} with label {int(labels[clash[0]])}; a "
                         "background point has label 0, a click or a correction label 1.")
    return kinds


@dataclass
class PointSet:
    """Points as read from a file. Physical files set ``lps``; voxel (i, j, k) files set ``ijk`` instead."""
    lps: Optional[np.ndarray]  # (N, 3) LPS mm, or None for a file in voxel coordinates
    labels: np.ndarray  # (N,) 1 foreground, 0 background
    names: List[str]
    source: str = ""
    ijk: Optional[np.ndarray] = None  # (N, 3) continuous voxel coordinates, when the file gave those
    kinds: Optional[List[str]] = None  # (N,) one of POINT_KINDS per point; None: from the labels

    def __post_init__(self):
        self.kinds = _checked_kinds(self.kinds, np.asarray(self.labels), self.source or "Prompts")

    def __len__(self) -> int:
        return len(self.labels)


def _point_set(coords, frame: str, labels=None, names=None, source: str = "", kinds=None) -> PointSet:
    coords = np.array(coords, dtype=float).reshape(-1, 3)  # a copy: the caller's array stays theirs
    n = len(coords)
    if labels is None and kinds is not None:
        labels = [0 if k == "background" else 1 for k in kinds]
    labels = np.ones(n, dtype=int) if labels is None else np.asarray(labels, dtype=int).reshape(-1)
    names = [""] * n if names is None else [str(s) for s in names]
    if len(labels) != n or len(names) != n:
        raise InputError(f"{source or 'Prompts'}: {n} points but {len(labels)} labels and {len(names)} names; "
                         "give one per point.")
    if not np.isfinite(coords).all():
        raise InputError(f"{source or 'Prompts'}: some coordinates are not finite (NaN or infinite); fix or remove "
                         "those points.")
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"{source or 'Prompts'}: point labels must be 1 (foreground) or 0 (background), "
                         f"not {sorted(set(labels.tolist()))}.")
    if frame == "ijk":
        return PointSet(None, labels, names, source, ijk=coords, kinds=kinds)
    return PointSet(ras_to_lps(coords) if frame == "ras" else coords, labels, names, source, kinds=kinds)


def from_ras(ras, labels=None, names=None, source: str = "", kinds=None) -> PointSet:
    """Points in RAS mm; ``labels`` (1 foreground, 0 background) and/or ``kinds`` (POINT_KINDS) per point."""
    return _point_set(ras, "ras", labels, names, source, kinds)


def from_lps(lps, labels=None, names=None, source: str = "", kinds=None) -> PointSet:
    return _point_set(lps, "lps", labels, names, source, kinds)


def from_ijk(ijk, labels=None, names=None, source: str = "", kinds=None) -> PointSet:
    return _point_set(ijk, "ijk", labels, names, source, kinds)


def kind_of_description(description) -> str:
    """A markups control point's kind from its description: "background", "correction" (either case, spaces
    around ignored) or, for anything else, "click". One rule for .mrk.json files and Slicer's point lists."""
    word = str(description or "").strip().lower()
    return word if word in CORRECTION_KINDS else "click"


# ---------------------------------------------------------------- reading files

def read(path) -> PointSet:
    """Read a Slicer markups ``.mrk.json`` or a ``.csv``/``.tsv`` point table."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Prompt file not found: {path}")
    name = path.name.lower()
    if name.endswith(".json"):
        points = _read_markups(path)
    elif name.endswith((".csv", ".tsv", ".txt", ".fcsv")):
        points = _read_table(path)
    else:
        raise InputError(f"Unsupported prompt file {path.name}: use a Slicer .mrk.json point list or a .csv/.tsv "
                         "with columns x,y,z[,label].")
    if len(points) == 0:
        raise InputError(f"{path.name} contains no points. Place at least one point on the structure and save again.")
    return points


def _read_markups(path: Path) -> PointSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path.name} is not valid JSON ({exc}). Re-save the point list from Slicer as .mrk.json.")
    if not isinstance(data, dict) or not isinstance(data.get("markups"), list):
        raise InputError(f"{path.name} has no 'markups' list; it is not a Slicer markups file. "
                         "Save the point list from Slicer (File > Save Data) as .mrk.json.")
    lps, kinds, names, skipped_types = [], [], [], []
    for m, markup in enumerate(data["markups"]):
        kind = markup.get("type") if isinstance(markup, dict) else None
        if kind not in POINT_TYPES:
            skipped_types.append(str(kind))
            continue
        frame = str(markup.get("coordinateSystem", "LPS")).upper()  # Slicer >= 5 writes LPS; older files had none
        if frame not in ("LPS", "RAS"):
            raise InputError(f"{path.name}: markup {m} has coordinateSystem {frame!r}; expected 'LPS' or 'RAS'.")
        for c, point in enumerate(markup.get("controlPoints") or []):
            # "undefined" points were never placed, "preview" ones are still under the mouse
            if not isinstance(point, dict) or point.get("positionStatus") in ("undefined", "preview") \
                    or point.get("position") is None:
                continue
            position = point["position"]
            try:
                xyz = np.asarray(position, dtype=float)
            except (TypeError, ValueError):
                xyz = np.empty(0)
            if xyz.shape != (3,) or not np.isfinite(xyz).all():
                raise InputError(f"{path.name}: control point {c} of markup {m} has position {position!r}; "
                                 "expected three finite numbers.")
            lps.append(ras_to_lps(xyz)[0] if frame == "RAS" else xyz)
            kinds.append(kind_of_description(point.get("description")))
            names.append(str(point.get("label", "")))
    if not lps:
        kinds = f" (found only: {', '.join(skipped_types)})" if skipped_types else ""
        raise InputError(f"{path.name} contains no placed points in a point list or curve{kinds}. "
                         "Place points with the Markups point list tool and save again.")
    return PointSet(np.array(lps, float), np.array([0 if k == "background" else 1 for k in kinds], int), names,
                    path.name, kinds=kinds)


def _table_frame(comment: str) -> Optional[str]:
    """The frame named by a comment such as '# coordinates: ras' or Slicer's '# CoordinateSystem = LPS'."""
    match = re.match(r"#\s*(coordinates?|coordinate\s*system|coordinatesystem|frame|space)\s*[:=]\s*(\w+)",
                     comment.strip(), re.IGNORECASE)
    if not match:
        return None
    value = match.group(2).lower()
    value = {"0": "ras", "1": "lps"}.get(value, value)  # Slicer 4 .fcsv numbered the frames
    if value not in ("ras", "lps", "ijk"):
        raise InputError(f"Unknown coordinate system {match.group(2)!r} in '{comment.strip()}'; use ras, lps or ijk.")
    return value


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _read_table(path: Path) -> PointSet:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path.name} is not a text file ({exc}).")
    frame, rows = None, []
    for line in lines:
        if line.lstrip().startswith("#"):
            frame = _table_frame(line) or frame
            if line.lower().lstrip("# ").startswith("columns"):  # Slicer .fcsv: header in a comment
                rows.append(line.split("=", 1)[-1])
        elif line.strip():
            rows.append(line)
    if not rows:
        raise InputError(f"{path.name} is empty. Write a header line 'x,y,z,label' and one line per point.")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in rows[0] else (";" if ";" in rows[0] else ",")
    table = list(csv.reader(rows, delimiter=delimiter))
    header = [h.strip().lower() for h in table[0]]
    columns = next(((cols, f) for cols, f in CSV_COLUMNS.items() if set(cols) <= set(header)), None)
    if columns is None:
        raise InputError(f"{path.name}: the first line {','.join(table[0])!r} is not a header with coordinate "
                         "columns. Start the file with a header such as 'x,y,z,label' (or r,a,s / l,p,s / i,j,k).")
    names_of_cols, column_frame = columns
    frame = column_frame or frame or "lps"  # x,y,z without a comment: LPS, as Slicer >= 5 files
    index = [header.index(c) for c in names_of_cols]

    def cell(row, col):
        return row[col].strip() if col < len(row) else ""

    coords, raw_labels, names, descriptions = [], [], [], []
    for number, row in enumerate(table[1:], start=2):
        if "defined" in header and cell(row, header.index("defined")).lower() in ("0", "false"):
            continue  # Slicer writes unplaced points with defined = 0
        try:
            xyz = [float(cell(row, i)) for i in index]
        except ValueError:
            raise InputError(f"{path.name}, data row {number}: coordinates {[cell(row, i) for i in index]} are not "
                             "all numbers.") from None
        if not np.isfinite(xyz).all():
            raise InputError(f"{path.name}, data row {number}: non-finite coordinate {xyz}; fix or remove the row.")
        coords.append(xyz)
        raw_labels.append(cell(row, header.index("label")) if "label" in header else "1")
        names.append(cell(row, header.index("name")) if "name" in header else "")
        description = next((header.index(c) for c in ("description", "desc") if c in header), None)  # .fcsv: desc
        descriptions.append(cell(row, description).lower() if description is not None else "")
    def kind_of_label(text: str) -> Optional[str]:
        number = _number(text)
        return KIND_OF_WORD.get(str(int(number)) if number is not None and number == int(number) else text.lower(),
                                None if number is None else "")

    kinds = [kind_of_label(s) for s in raw_labels]
    if all(k is not None for k in kinds):
        if "" in kinds:
            wrong = sorted({s for s, k in zip(raw_labels, kinds) if k == ""})
            raise InputError(f"{path.name}: the label column has {wrong}; use 1 (or fg) for clicks, 0 (or bg) for "
                             "background points and 'correction' for foreground corrections.")
    else:  # Slicer's own CSV uses 'label' for the point's name; the description gives the kind
        names = raw_labels
        kinds = [kind_of_description(d) for d in descriptions]
    return _point_set(np.array(coords, float).reshape(-1, 3), frame, names=names, source=path.name, kinds=kinds)


# ---------------------------------------------------------------- to voxels

class AxisChoice(int):
    """An array axis (0, 1, 2) that says where it came from: ``source`` (one of ``AXIS_SOURCES``) and ``why``.

    It is an int, so it goes wherever an axis goes; ``to_voxels`` keeps its source (the Slicer adapter
    returns the axis of the view the clicks were placed in as ``AxisChoice(axis, "view")``).
    """

    def __new__(cls, axis, source: str = "given", why: str = ""):
        if source not in AXIS_SOURCES:
            raise ValueError(f"unknown axis source {source!r}; one of {AXIS_SOURCES}")
        choice = super().__new__(cls, int(axis))
        choice.source, choice.why = source, why
        return choice

    def __repr__(self) -> str:
        return f"AxisChoice({int(self)}, {self.source!r})"


@dataclass
class VoxelPrompts:
    ijk: np.ndarray  # (N, 3) continuous (i, j, k) of the points inside the volume
    labels: np.ndarray  # (N,)
    axis: int  # slicing axis as an array axis of Volume.array (0 = k, 1 = j, 2 = i)
    outside_lps: np.ndarray  # (M, 3) points outside the volume (reported, never clamped)
    names: List[str] = field(default_factory=list)
    shape: Optional[Tuple[int, int, int]] = None  # Volume.array shape (k, j, i)
    axis_source: str = "given"  # where the axis came from: one of AXIS_SOURCES
    axis_why: str = ""  # the numbers behind an automatic choice (axis_note says it in words)
    kinds: List[str] = field(default_factory=list)  # (N,) one of POINT_KINDS per point; empty: from the labels

    def __post_init__(self):
        self.kinds = _checked_kinds(self.kinds if len(self.kinds) or not len(self.labels) else None,
                                    np.asarray(self.labels), "Prompts")

    def __len__(self) -> int:
        return len(self.labels)

    def is_correction(self) -> np.ndarray:
        """(N,) bool: the point is a correction (a foreground correction or a background click)."""
        return np.array([k in CORRECTION_KINDS for k in self.kinds], bool)

    def select(self, keep) -> "VoxelPrompts":
        """These prompts with only the points where ``keep`` (a boolean mask or indices) holds, in order."""
        keep = np.arange(len(self))[keep]
        return dataclasses.replace(self, ijk=self.ijk[keep], labels=self.labels[keep],
                                   names=[self.names[i] for i in keep] if len(self.names) == len(self) else [],
                                   kinds=[self.kinds[i] for i in keep])

    def slice_index(self) -> np.ndarray:
        t = np.floor(self.ijk[:, 2 - self.axis] + 0.5).astype(int)
        if self.shape is not None:  # a point on the outer face (-0.5 or size - 0.5) belongs to the edge slice
            t = np.clip(t, 0, self.shape[self.axis] - 1)
        return t

    def rc(self) -> np.ndarray:
        row_axis, col_axis = slice_axes(self.axis)
        return self.ijk[:, [2 - row_axis, 2 - col_axis]]

    def by_slice(self) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """slice -> (rc (n, 2), labels (n,)) of every point on it, in their order."""
        t, rc = self.slice_index(), self.rc()
        return {int(s): (rc[t == s], self.labels[t == s]) for s in np.unique(t)}

    def corrections_by_slice(self) -> Dict[int, np.ndarray]:
        """slice -> (n,) bool beside :meth:`by_slice`'s points: which of them are corrections."""
        t, correction = self.slice_index(), self.is_correction()
        return {int(s): correction[t == s] for s in np.unique(t)}


def _physical_bounds(volume: Volume) -> np.ndarray:
    """(2, 3) LPS min / max over the corners of the voxel grid (voxel faces, not centres)."""
    size = np.array(volume.shape[::-1], float)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in size])))
    lps = ijk_to_physical(corners, volume.ijk_to_lps)
    return np.stack([lps.min(0), lps.max(0)])


def _inside(ijk: np.ndarray, volume: Volume) -> np.ndarray:
    size = np.array(volume.shape[::-1], float)
    return np.all((ijk >= -0.5 - EDGE_TOLERANCE) & (ijk <= size - 0.5 + EDGE_TOLERANCE), axis=1)


def to_voxels(points: PointSet, volume: Volume, axis=None, preferred_axes: Sequence[int] = ()) -> VoxelPrompts:
    """Physical (or voxel) points -> continuous ijk inside ``volume``, with the slicing axis chosen.

    ``axis``: None or "auto" chooses from the points (:func:`choose_axis`, with ``preferred_axes``, the
    orientations the model was trained on, see ``pipeline.trained_axes``); a name or 0/1/2 is "given"; an
    :class:`AxisChoice` keeps its source (e.g. "view").
    """
    source = f" from {points.source}" if points.source else ""
    if len(points) == 0:
        raise InputError(f"There are no prompts{source}: place at least one point on the structure.")
    if points.ijk is not None:
        ijk = np.asarray(points.ijk, float).reshape(-1, 3)
        lps = ijk_to_physical(ijk, volume.ijk_to_lps)
    else:
        lps = np.asarray(points.lps, float).reshape(-1, 3)
        ijk = physical_to_ijk(lps, volume.ijk_to_lps)
    inside = _inside(ijk, volume)
    if not inside.any():
        lo, hi = _physical_bounds(volume)
        box = ", ".join(f"{a} {l:.1f}..{h:.1f}" for a, l, h in zip("LPS", lo, hi))
        if points.ijk is not None:
            hint = f"Check that the i,j,k columns refer to this image (its size in i,j,k is {volume.shape[::-1]})."
        else:
            flipped = _inside(physical_to_ijk(ras_to_lps(lps), volume.ijk_to_lps), volume).sum()
            hint = ("Check the coordinate system (LPS or RAS) of the points"
                    + (f": read as the other one, {flipped} of them would fall inside." if flipped else
                       " and that they were placed on this image."))
        raise InputError(f"All {len(ijk)} prompt points{source} lie outside the image {volume.name!r}, whose physical "
                         f"extent is {box} mm (LPS). {hint}")
    names = list(points.names) if len(points.names) == len(ijk) else [""] * len(ijk)
    inside_ijk = ijk[inside]
    if axis is None or (isinstance(axis, str) and axis.strip().lower() == "auto"):
        axis = choose_axis(inside_ijk, volume, preferred_axes)
    elif isinstance(axis, str):
        axis = AxisChoice(axis_from_name(axis, volume), "given")
    else:
        try:
            value = int(axis)
        except (TypeError, ValueError):
            value = None
        if value not in (0, 1, 2):
            raise InputError(f"Slicing axis {axis} is not an array axis; use 0, 1, 2, 'axial', 'coronal' or "
                             "'sagittal'.")
        axis = AxisChoice(value, getattr(axis, "source", "given"), getattr(axis, "why", ""))
    return VoxelPrompts(ijk=inside_ijk, labels=np.asarray(points.labels, int)[inside], axis=int(axis),
                        outside_lps=lps[~inside], names=[n for n, keep in zip(names, inside) if keep],
                        shape=tuple(volume.shape), axis_source=axis.source, axis_why=axis.why,
                        kinds=[k for k, keep in zip(points.kinds, inside) if keep])


def choose_axis(ijk: np.ndarray, volume: Volume, preferred_axes: Sequence[int] = ()) -> AxisChoice:
    """The slicing axis for these points (array axis; its ``source`` and ``why`` say how it was found).

    1. **Slice planes.** Clicks placed in a slice view lie on integer planes of that view's axis (within
       ``INTEGER_TOLERANCE``). If exactly one axis fits, it is the one ("slice planes").
    2. **The clicks' geometry**, when several axes fit (points at voxel centres: a centerline exported by
       another tool, a skeleton, a curve resampled on the grid) or none does (points placed in 3D): a
       centerline runs across slices, so slice perpendicular to it. Among the fitting axes (all three if
       none fits), keep those along which the points spread over the most slices, so with the fewest
       points per slice (within ``SPREAD_CLOSE`` of the largest, at least one slice); if several remain and
       the points are elongated (largest variance >= ``ELONGATION`` x the next, in mm), keep those the
       points' main direction (first principal component, in mm) is most aligned with (within
       ``DIRECTION_CLOSE`` of the best |cos|). One left: "clicks' geometry".
    3. **Close call.** Several left: the first of ``preferred_axes`` among them (the orientations the model
       was trained on, ``pipeline.trained_axes``): "trained orientation"; otherwise the first in the
       order axial, coronal, sagittal (by the image direction): "tie".
    """
    ijk = np.asarray(ijk, float).reshape(-1, 3)
    order = [axis_from_name(n, volume) for n in ANATOMICAL_ORDER]
    if len(ijk) == 0:
        return AxisChoice(order[0], "tie", "no points")
    on_planes = [a for a in order if np.all(np.abs(ijk[:, 2 - a] - np.round(ijk[:, 2 - a])) <= INTEGER_TOLERANCE)]
    if len(on_planes) == 1:
        return AxisChoice(on_planes[0], "slice planes", f"all {len(ijk)} points on its slice planes")
    candidates = on_planes or order
    names = {a: axis_name(a, volume) for a in range(3)}
    spread = {a: len(np.unique(np.floor(ijk[:, 2 - a] + 0.5))) for a in candidates}
    top = max(spread.values())
    close = [a for a in candidates if spread[a] >= top - max(1.0, SPREAD_CLOSE * top)]
    ranked = sorted(candidates, key=lambda a: -spread[a])
    why = "clicks on " + ", ".join(f"{spread[a]} {names[a]}" for a in ranked) + " slices"
    if len(close) > 1:
        alignment = _main_direction_alignment(ijk, volume)
        if alignment is not None:
            best = max(alignment[a] for a in close)
            close = [a for a in close if alignment[a] >= best - DIRECTION_CLOSE]
            why += "; main direction |cos| " + ", ".join(f"{names[a]} {alignment[a]:.2f}" for a in candidates)
        else:
            why += "; no main direction"
    if len(close) == 1:
        return AxisChoice(close[0], "clicks' geometry", why)
    preferred = [int(a) for a in preferred_axes if int(a) in close]
    if preferred:
        return AxisChoice(preferred[0], "trained orientation",
                          why + "; close: " + ", ".join(names[a] for a in close))
    return AxisChoice(close[0], "tie", why + "; close: " + ", ".join(names[a] for a in close))


def _main_direction_alignment(ijk: np.ndarray, volume: Volume) -> Optional[Dict[int, float]]:
    """|cos| between the points' main direction (first principal component in mm) and each array axis's
    physical direction; None when the points are not elongated (or fewer than two distinct ones)."""
    lps = ijk_to_physical(ijk, volume.ijk_to_lps)
    if len(lps) < 2:
        return None
    variance, vectors = np.linalg.eigh(np.cov((lps - lps.mean(0)).T))
    variance = np.clip(variance, 0.0, None)
    if variance[-1] <= 1e-12 or variance[-1] < ELONGATION * variance[-2]:
        return None
    main = vectors[:, -1]
    directions = volume.ijk_to_lps[:3, :3] / np.linalg.norm(volume.ijk_to_lps[:3, :3], axis=0)  # columns i, j, k
    return {a: float(abs(main @ directions[:, 2 - a])) for a in range(3)}


def axis_name(axis: int, volume: Volume) -> str:
    """'axial', 'coronal' or 'sagittal': the anatomical name of array axis ``axis`` of ``volume`` (the
    inverse of :func:`axis_from_name`, from the image direction)."""
    return next(n for n in ANATOMICAL_ORDER if axis_from_name(n, volume) == int(axis))


def axis_note(prompts: "VoxelPrompts", volume: Volume) -> str:
    """One line: which axis the prompts are sliced along, by name and array axis, and why."""
    axis = int(prompts.axis)
    name = axis_name(axis, volume)
    source, why = getattr(prompts, "axis_source", "given"), getattr(prompts, "axis_why", "")
    head = f"{name} slices (array axis {axis})"
    if source == "given":
        return f"{head}, as given"
    if source == "view":
        return f"{head}, the slice view the clicks were placed in"
    if source == "slice planes":
        return f"{head}: the clicks lie on its slice planes"
    if source == "clicks' geometry":
        return f"{head} from the clicks' geometry ({why})"
    if source == "trained orientation":
        return f"{head}: the clicks' geometry is a close call ({why}); the model was trained on {name} slices"
    return f"{head}: a tie in the clicks' geometry ({why}); first in the order axial, coronal, sagittal. " \
           "Set the axis to choose"


def axis_from_name(name, volume: Volume) -> int:
    """'axial' / 'coronal' / 'sagittal' (or Slicer's red / green / yellow, or 0/1/2, k/j/i) -> array axis."""
    key = str(name).strip().lower()
    if key in ("0", "1", "2"):
        return int(key)
    if key in ("k", "j", "i"):
        return "kji".index(key)
    if key not in SLICE_VIEW_NAMES:
        raise InputError(f"Unknown slicing axis {name!r}; use auto, axial, coronal, sagittal, 0, 1 or 2.")
    direction = np.abs(volume.ijk_to_lps[:3, :3] / np.linalg.norm(volume.ijk_to_lps[:3, :3], axis=0))
    # one ijk column per anatomical axis (L, P, S), best aligned overall, so that oblique
    # volumes still give three different axes
    columns = max(itertools.permutations(range(3)), key=lambda p: sum(direction[row, p[row]] for row in range(3)))
    row = {"sagittal": 0, "coronal": 1, "axial": 2}[SLICE_VIEW_NAMES[key]]
    return 2 - columns[row]


# ---------------------------------------------------------------- writing

def write_markups(path, lps: np.ndarray, names: Optional[Sequence[str]] = None,
                  descriptions: Optional[Sequence[str]] = None, color=(1.0, 0.5, 0.0),
                  node_name: str = "SPD prompts", locked: bool = True, labels=None, kinds=None) -> Path:
    """Write a Slicer point list (``.mrk.json``, LPS).

    Without ``descriptions``, a point's description is its kind: "correction" or "background" for those
    ``kinds`` (labels 0 are "background" when no kinds are given), empty for a click, so the file reads back
    with the same kinds.
    """
    path = Path(path)
    lps = np.asarray(lps, float).reshape(-1, 3)
    if not np.isfinite(lps).all():
        raise InputError("Cannot write markups: some point coordinates are not finite.")
    n = len(lps)
    names = [f"P-{i + 1}" for i in range(n)] if names is None else [str(s) for s in names]
    if descriptions is None:
        if kinds is None:
            kinds = ["click"] * n if labels is None else kinds_from_labels(labels)
        descriptions = [k if k in CORRECTION_KINDS else "" for k in kinds]
    if len(names) != n or len(descriptions) != n:
        raise InputError(f"Cannot write markups: {n} points, {len(names)} names, {len(descriptions)} descriptions.")
    color = [float(c) for c in color]
    points = [{"id": str(i + 1), "label": names[i], "description": str(descriptions[i]), "associatedNodeID": "",
               "position": [float(v) for v in lps[i]],
               "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],  # identity in RAS, seen from LPS
               "selected": True, "locked": bool(locked), "visibility": True, "positionStatus": "defined"}
              for i in range(n)]
    document = {"@schema": MARKUPS_SCHEMA, "markups": [{
        "type": "Fiducial", "name": node_name, "coordinateSystem": "LPS", "coordinateUnits": "mm",
        "locked": bool(locked), "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": n, "controlPoints": points, "measurements": [],
        "display": {"visibility": True, "opacity": 1.0, "color": color, "selectedColor": color,
                    "propertiesLabelVisibility": False, "pointLabelsVisibility": True, "textScale": 3.0,
                    "glyphType": "Sphere3D", "glyphScale": 3.0, "glyphSize": 5.0, "useGlyphScale": True}}]}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def write_points(path, points: PointSet, node_name: str = "SPD prompts") -> Path:
    """Write ``points`` with their kinds: a ``.mrk.json`` point list (:func:`write_markups`) or a ``.csv``
    table ``l,p,s,label,name`` (LPS mm; label fg, correction or bg). Both read back with :func:`read`."""
    path = Path(path)
    if points.lps is None:
        raise InputError("Cannot write points given in voxel coordinates; convert them to LPS first.")
    name = path.name.lower()
    if name.endswith(".json"):
        return write_markups(path, points.lps, names=points.names or None, kinds=points.kinds, node_name=node_name,
                             locked=False)
    if not name.endswith(".csv"):
        raise InputError(f"Cannot write points to {path.name}: use a .mrk.json or .csv file.")
    lines = ["# coordinates: lps", "l,p,s,label,name"]
    names = points.names if len(points.names) == len(points) else [""] * len(points)
    for xyz, kind, point_name in zip(np.asarray(points.lps, float), points.kinds, names):
        lines.append(",".join([*(f"{v:.6g}" for v in xyz), CSV_LABEL_OF_KIND[kind], str(point_name).replace(",", " ")]))
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
