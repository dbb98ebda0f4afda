"""Prompt points: Slicer markups / CSV files -> physical points -> voxels -> prompts per slice.

Frames are named in every variable: ``lps``/``ras`` millimetres, ``ijk`` continuous voxel (i, j, k),
``rc`` (row, col) in a slice. Points outside the image are reported, never clamped onto it.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
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
EDGE_TOLERANCE = 1e-6  # voxels: a point on the image's outer face still counts as inside
# Column triples a CSV may use, and the frame each implies (x, y, z take the frame from a comment).
CSV_COLUMNS = {("r", "a", "s"): "ras", ("l", "p", "s"): "lps", ("i", "j", "k"): "ijk", ("x", "y", "z"): None}
SLICE_VIEW_NAMES = {"axial": "axial", "red": "axial", "coronal": "coronal", "green": "coronal",
                    "sagittal": "sagittal", "yellow": "sagittal"}


@dataclass
class PointSet:
    """Points as read from a file. Physical files set ``lps``; voxel (i, j, k) files set ``ijk`` instead."""
    lps: Optional[np.ndarray]  # (N, 3) LPS mm, or None for a file in voxel coordinates
    labels: np.ndarray  # (N,) 1 foreground, 0 background
    names: List[str]
    source: str = ""
    ijk: Optional[np.ndarray] = None  # (N, 3) continuous voxel coordinates, when the file gave those

    def __len__(self) -> int:
        return len(self.labels)


def _point_set(coords, frame: str, labels=None, names=None, source: str = "") -> PointSet:
    coords = np.array(coords, dtype=float).reshape(-1, 3)  # a copy: the caller's array stays theirs
    n = len(coords)
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
        return PointSet(None, labels, names, source, ijk=coords)
    return PointSet(ras_to_lps(coords) if frame == "ras" else coords, labels, names, source)


def from_ras(ras, labels=None, names=None, source: str = "") -> PointSet:
    return _point_set(ras, "ras", labels, names, source)


def from_lps(lps, labels=None, names=None, source: str = "") -> PointSet:
    return _point_set(lps, "lps", labels, names, source)


def from_ijk(ijk, labels=None, names=None, source: str = "") -> PointSet:
    return _point_set(ijk, "ijk", labels, names, source)


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
    lps, labels, names, skipped_types = [], [], [], []
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
            background = str(point.get("description", "")).strip().lower() == "background"
            labels.append(0 if background else 1)
            names.append(str(point.get("label", "")))
    if not lps:
        kinds = f" (found only: {', '.join(skipped_types)})" if skipped_types else ""
        raise InputError(f"{path.name} contains no placed points in a point list or curve{kinds}. "
                         "Place points with the Markups point list tool and save again.")
    return PointSet(np.array(lps, float), np.array(labels, int), names, path.name)


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
    words = {"fg": 1, "bg": 0, "foreground": 1, "background": 0, "positive": 1, "negative": 0}
    values = [words.get(s.lower(), _number(s)) for s in raw_labels]
    if all(v is not None for v in values):
        if not set(values) <= {0, 1}:
            raise InputError(f"{path.name}: the label column has {sorted(set(values) - {0, 1})}; "
                             "use 1 for foreground points and 0 for background points.")
        labels = [int(v) for v in values]
    else:  # Slicer's own CSV uses 'label' for the point's name; the description marks background
        names = raw_labels
        labels = [0 if d == "background" else 1 for d in descriptions]
    return _point_set(np.array(coords, float).reshape(-1, 3), frame, labels, names, path.name)


# ---------------------------------------------------------------- to voxels

@dataclass
class VoxelPrompts:
    ijk: np.ndarray  # (N, 3) continuous (i, j, k) of the points inside the volume
    labels: np.ndarray  # (N,)
    axis: int  # slicing axis as an array axis of Volume.array (0 = k, 1 = j, 2 = i)
    outside_lps: np.ndarray  # (M, 3) points outside the volume (reported, never clamped)
    names: List[str] = field(default_factory=list)
    shape: Optional[Tuple[int, int, int]] = None  # Volume.array shape (k, j, i)

    def __len__(self) -> int:
        return len(self.labels)

    def slice_index(self) -> np.ndarray:
        t = np.floor(self.ijk[:, 2 - self.axis] + 0.5).astype(int)
        if self.shape is not None:  # a point on the outer face (-0.5 or size - 0.5) belongs to the edge slice
            t = np.clip(t, 0, self.shape[self.axis] - 1)
        return t

    def rc(self) -> np.ndarray:
        row_axis, col_axis = slice_axes(self.axis)
        return self.ijk[:, [2 - row_axis, 2 - col_axis]]

    def by_slice(self) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        t, rc = self.slice_index(), self.rc()
        return {int(s): (rc[t == s], self.labels[t == s]) for s in np.unique(t)}


def _physical_bounds(volume: Volume) -> np.ndarray:
    """(2, 3) LPS min / max over the corners of the voxel grid (voxel faces, not centres)."""
    size = np.array(volume.shape[::-1], float)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in size])))
    lps = ijk_to_physical(corners, volume.ijk_to_lps)
    return np.stack([lps.min(0), lps.max(0)])


def _inside(ijk: np.ndarray, volume: Volume) -> np.ndarray:
    size = np.array(volume.shape[::-1], float)
    return np.all((ijk >= -0.5 - EDGE_TOLERANCE) & (ijk <= size - 0.5 + EDGE_TOLERANCE), axis=1)


def to_voxels(points: PointSet, volume: Volume, axis=None) -> VoxelPrompts:
    """Physical (or voxel) points -> continuous ijk inside ``volume``, with the slicing axis chosen."""
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
        axis = choose_axis(inside_ijk, volume)
    elif isinstance(axis, str):
        axis = axis_from_name(axis, volume)
    elif int(axis) not in (0, 1, 2):
        raise InputError(f"Slicing axis {axis} is not an array axis; use 0, 1, 2, 'axial', 'coronal' or 'sagittal'.")
    return VoxelPrompts(ijk=inside_ijk, labels=np.asarray(points.labels, int)[inside], axis=int(axis),
                        outside_lps=lps[~inside], names=[n for n, keep in zip(names, inside) if keep],
                        shape=tuple(volume.shape))


def choose_axis(ijk: np.ndarray, volume: Volume) -> int:
    """The array axis whose slice planes the points were clicked on (integer coordinates on that axis)."""
    ijk = np.asarray(ijk, float).reshape(-1, 3)
    axial = axis_from_name("axial", volume)
    if len(ijk) == 0:
        return axial
    qualified = [a for a in range(3)
                 if np.all(np.abs(ijk[:, 2 - a] - np.round(ijk[:, 2 - a])) <= INTEGER_TOLERANCE)]
    if not qualified:
        return axial
    # several fit (e.g. points at voxel centres): clicks step along the structure, so most distinct slices
    counts = {a: len(np.unique(np.round(ijk[:, 2 - a]))) for a in qualified}
    best = [a for a in qualified if counts[a] == max(counts.values())]
    preference = [axis_from_name(n, volume) for n in ("axial", "coronal", "sagittal")]
    return min(best, key=preference.index)


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
                  node_name: str = "SPD prompts", locked: bool = True, labels=None) -> Path:
    """Write a Slicer point list (``.mrk.json``, LPS). ``labels`` 0 become description 'background'."""
    path = Path(path)
    lps = np.asarray(lps, float).reshape(-1, 3)
    if not np.isfinite(lps).all():
        raise InputError("Cannot write markups: some point coordinates are not finite.")
    n = len(lps)
    names = [f"P-{i + 1}" for i in range(n)] if names is None else [str(s) for s in names]
    if descriptions is None:
        descriptions = ["" if labels is None or labels[i] else "background" for i in range(n)]
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
