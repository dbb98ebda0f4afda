"""MSD / nnU-Net datasets (imagesTr, labelsTr), the fixed benchmark splits, and training slices.

Case names are file names without extension (and without nnU-Net's ``_0000`` channel suffix).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import InputError
from ..core.volume import read, read_label

SPLITS_PATH = Path(__file__).parent / "splits.json"
EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class Case:
    name: str
    image: Path
    label: Path

    def load(self):
        volume = read(self.image)
        label = read_label(self.label, like=volume)
        if not label.any():
            raise InputError(f"The label of case {self.name} ({self.label}) is empty: nothing to train on.")
        return volume, label


def _stem(path: Path) -> str:
    name = path.name
    for ext in EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name[:-5] if name.endswith("_0000") else name


def find_cases(data_dir: Path, names: Optional[List[str]] = None) -> List[Case]:
    """Pairs of image and label in ``data_dir/imagesTr`` and ``data_dir/labelsTr``."""
    data_dir = Path(data_dir)
    images_dir, labels_dir = data_dir / "imagesTr", data_dir / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise InputError(f"{data_dir} is not an MSD/nnU-Net folder: it needs imagesTr/ and labelsTr/ subfolders.")
    labels = {_stem(p): p for p in labels_dir.iterdir() if p.name.endswith(EXTENSIONS) and not p.name.startswith(".")}
    cases = []
    for image in sorted(images_dir.iterdir()):
        if image.name.startswith(".") or not image.name.endswith(EXTENSIONS):
            continue
        name = _stem(image)
        if name in labels:
            cases.append(Case(name, image, labels[name]))
    if names is not None:
        by_name = {c.name: c for c in cases}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputError(f"Cases not found in {data_dir}: {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
        cases = [by_name[n] for n in names]
    if not cases:
        raise InputError(f"No cases found in {data_dir}: expected imagesTr/NAME.nii.gz with labelsTr/NAME.nii.gz.")
    return cases


def load_split(dataset: str) -> Dict[str, object]:
    """The fixed split of a benchmark dataset: {"axis": int, "modality": str, "train_full": [...], "test_full": [...],
    and the small "train"/"test" subsets used by the quick benchmark}."""
    with open(SPLITS_PATH, encoding="utf-8") as handle:
        splits = json.load(handle)
    if dataset not in splits:
        raise InputError(f"No fixed split for {dataset!r}; known: {sorted(splits)}.")
    return splits[dataset]


# ---------------------------------------------------------------- where the structure is

def structure_slices(label: np.ndarray, axis: int) -> np.ndarray:
    """The slices along array ``axis`` that hold foreground (nonzero voxels), ascending; empty if none."""
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(np.asarray(label).any(axis=other))


def structure_range(label: np.ndarray, axis: int, margin: int = 0) -> Tuple[int, int]:
    """First and last slice (inclusive) holding foreground along ``axis``, widened by ``margin`` slices on
    each side and kept inside the volume. Raises InputError for an empty label."""
    present = structure_slices(label, axis)
    if not len(present):
        raise InputError("The label is empty: it has no foreground voxel (label > 0). Check the label file and "
                         "that it belongs to this image.")
    return max(0, int(present[0]) - margin), min(label.shape[axis] - 1, int(present[-1]) + margin)


def training_slices(label: np.ndarray, axis: int, margin: int) -> List[int]:
    """The structure's slices plus ``margin`` slices on each side (where neighbours are borrowed from)."""
    first, last = structure_range(label, axis, margin)
    return list(range(first, last + 1))
