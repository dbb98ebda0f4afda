"""Images and their geometry.

Conventions (see docs/architecture.md):
- ``Volume.array`` is indexed (k, j, i) = (z, y, x), as SimpleITK gives it.
- ``ijk`` points are (i, j, k) continuous voxel coordinates; ``lps``/``ras`` are millimetres.
- ``ijk_to_lps`` is a 4x4 built from origin, spacing and direction (oblique allowed).
- A *slicing axis* is an array axis (0 = k, 1 = j, 2 = i). Slice ``t`` along axis ``a`` is
  ``np.take(array, t, axis=a)``; its 2D ``rc`` (row, col) are the remaining array axes in order.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .files import atomic_write
from .integrity import check_image_file

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Window presets (level, width) in Hounsfield units, as Slicer's volume display presets.
CT_WINDOWS = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


@dataclass
class Volume:
    array: np.ndarray  # (k, j, i)
    ijk_to_lps: np.ndarray  # 4 x 4
    name: str = "volume"
    _voxel_hash: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)  # (array, hash)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along (i, j, k) in mm."""
        return np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps

    def fingerprint(self) -> str:
        """Content hash of voxels and geometry: the key of the embedding cache.

        The voxels of a read-only array (the Slicer adapter's private copy) are hashed once: the
        Segment Editor asks on every click, and hashing a 512 x 512 x 600 int16 CT takes ~0.2 s."""
        memo = self._voxel_hash
        voxel_hash = memo[1] if memo is not None and memo[0] is self.array else None
        if voxel_hash is None:
            h = hashlib.sha256()
            h.update(str(self.array.shape).encode() + str(self.array.dtype).encode())
            h.update(memoryview(np.ascontiguousarray(self.array)).cast("B"))  # no copy of a large volume
            voxel_hash = h.hexdigest()
            if not self.array.flags.writeable:
                self._voxel_hash = (self.array, voxel_hash)
        h = hashlib.sha256(voxel_hash.encode())
        h.update(np.round(self.ijk_to_lps, 6).tobytes())
        return h.hexdigest()[:32]


def geometry_matrix(origin, spacing, direction) -> np.ndarray:
    """ijk -> physical 4x4 from SimpleITK-style origin, spacing and 3x3 direction (row-major)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    m[:3, 3] = np.asarray(origin, float)
    return m


def ijk_to_physical(points_ijk: np.ndarray, ijk_to_phys: np.ndarray) -> np.ndarray:
    p = np.asarray(points_ijk, float).reshape(-1, 3)
    return p @ ijk_to_phys[:3, :3].T + ijk_to_phys[:3, 3]


def physical_to_ijk(points_phys: np.ndarray, ijk_to_phys: np.ndarray) -> np.ndarray:
    p = np.asarray(points_phys, float).reshape(-1, 3)
    inv = np.linalg.inv(ijk_to_phys)
    return p @ inv[:3, :3].T + inv[:3, 3]


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    p = np.array(points, float).reshape(-1, 3)
    p[:, :2] *= -1
    return p


lps_to_ras = ras_to_lps  # the same sign flip


def validate_array(array: np.ndarray, what: str = "image") -> np.ndarray:
    """Reject images SPD cannot segment: not 3D, empty, or with NaN/inf voxels."""
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(
            f"The {what} has {array.ndim} dimensions {tuple(array.shape)}; SPD needs a 3D scalar volume. "
            "Extract one time point or channel first (for a 2D image, stack it into a one-slice volume)."
        )
    if min(array.shape) < 1:
        raise InputError(f"The {what} is empty: shape {tuple(array.shape)}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(
            f"The {what} has {bad} NaN or infinite voxels; fill or mask them (e.g. replace with the minimum) and retry."
        )
    return array


def from_sitk(image, name: str = "volume") -> Volume:
    if image.GetDimension() != 3:
        raise InputError(
            f"The image has {image.GetDimension()} dimensions; SPD needs a 3D volume "
            "(choose one time point of a 4D series, or stack a 2D image into a volume)."
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The image has {image.GetNumberOfComponentsPerPixel()} components per voxel; SPD needs a scalar volume."
        )
    array = validate_array(sitk.GetArrayFromImage(image))
    matrix = geometry_matrix(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(array=array, ijk_to_lps=matrix, name=name)


def read(path: str | os.PathLike) -> Volume:
    """Read NIfTI, NRRD, MHA (a file) or a DICOM series (a folder) keeping the geometry."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Image not found: {path}")
    check_image_file(path)  # a truncated or corrupt file is refused (ITK would zero-fill some)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"No DICOM series found in folder {path}.")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from exc
    name = path.name.split(".")[0]
    return from_sitk(image, name=name)


def to_sitk(array: np.ndarray, ijk_to_lps: np.ndarray):
    image = sitk.GetImageFromArray(array)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (ijk_to_lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(o) for o in ijk_to_lps[:3, 3]])
    return image


def read_label(path: str | os.PathLike, like: Optional[Volume] = None) -> np.ndarray:
    """Read a label map as uint8 foreground (label > 0); check it matches ``like``'s grid."""
    label = read(path)
    if like is not None:
        if label.shape != like.shape or not np.allclose(label.ijk_to_lps, like.ijk_to_lps, atol=1e-3):
            raise InputError(
                f"Label {path} does not match its image: shape {label.shape} vs {like.shape} or different "
                "origin/spacing/direction. Resample the label onto the image grid."
            )
    return (label.array > 0).astype(np.uint8)


# ---------------------------------------------------------------- intensity

def intensity_range(array: np.ndarray, modality: str = "auto", window=None,
                    percentiles: Tuple[float, float] = (0.5, 99.5)) -> Tuple[float, float]:
    """The (lo, hi) intensities that :func:`apply_range` maps to 0 and 1, slice by slice.

    ``window`` (level, width) or a preset name of :data:`CT_WINDOWS` gives a window; ``modality`` "ct"
    without one uses the soft-tissue window; otherwise (MR, "auto") the ``percentiles`` of the nonzero
    voxels (of a strided sample of at most ~2 million voxels).
    """
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise InputError(f"Unknown window preset {window!r}; choose one of {', '.join(CT_WINDOWS)}, or give "
                             "(level, width).")
        window = CT_WINDOWS[window]
    if window is None and modality == "ct":
        window = CT_WINDOWS["soft_tissue"]
    if window is not None:
        return window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
    step = max(1, array.size // 2_000_000)
    sample = np.asarray(array).ravel()[::step]
    nz = sample[sample != 0]
    sample = nz if nz.size else sample
    lo, hi = np.percentile(sample.astype(np.float32), percentiles)
    return float(lo), float(max(hi, lo + 1.0))


def apply_range(slice2d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (np.asarray(slice2d, np.float32) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------- slices

def get_slice(array: np.ndarray, axis: int, t: int) -> np.ndarray:
    return np.take(array, t, axis=axis)


def slice_axes(axis: int) -> Tuple[int, int]:
    """Array axes that become (row, col) of a slice along ``axis``."""
    return tuple(a for a in range(3) if a != axis)  # type: ignore[return-value]


def put_slice(volume_array: np.ndarray, axis: int, t: int, slice2d: np.ndarray) -> None:
    index = [slice(None)] * 3
    index[axis] = t
    volume_array[tuple(index)] = slice2d


def fingerprint_key(volume: Volume, axis: int, backbone_id: str, intensity: Tuple[float, float]) -> str:
    return f"{volume.fingerprint()}:{axis}:{backbone_id}:{intensity[0]:.4g}:{intensity[1]:.4g}"


# ---------------------------------------------------------------- output

SEGMENTATION_SUFFIXES = (".seg.nrrd",)
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # label maps and other volumes (saliency)


def output_type_error(path: str | os.PathLike, suffixes, what: str) -> Optional[str]:
    """Why ``path`` cannot be written as ``what`` (its extension), or None."""
    name = Path(path).name.lower()
    if name.endswith(tuple(suffixes)) and not name.startswith(tuple(suffixes)):
        return None
    return f"Unsupported {what} type {Path(path).name!r}; use {', '.join(suffixes)}."


def write_segmentation(path: str | os.PathLike, mask: np.ndarray, ijk_to_lps: np.ndarray,
                       segment_name: str = "Segment_1", color=(0.9, 0.6, 0.2), method: str = "SPD") -> Path:
    """Write a Slicer ``.seg.nrrd`` (one binary segment) or a NIfTI/NRRD label map.

    ``method`` is recorded in the segment's tags (``SPDSegment.method:SPD``, or e.g. ``raw SAM``).
    The file is written to a temporary name and renamed, so a failure leaves no partial file.
    """
    path = Path(path)
    mask = np.asarray(mask, dtype=np.uint8)
    if path.name.lower().endswith(".seg.nrrd"):
        image = to_sitk(mask, ijk_to_lps)
        extent = f"0 {mask.shape[2] - 1} 0 {mask.shape[1] - 1} 0 {mask.shape[0] - 1}"
        fields = {
            "Segmentation_MasterRepresentation": "Binary labelmap",
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
            "Segmentation_ReferenceImageExtentOffset": "0 0 0",
            "Segment0_ID": "Segment_1",
            "Segment0_Name": segment_name,
            "Segment0_Color": " ".join(f"{c:g}" for c in color),
            "Segment0_ColorAutoGenerated": "0",
            "Segment0_LabelValue": "1",
            "Segment0_Layer": "0",
            "Segment0_Extent": extent,
            "Segment0_Tags": f"SPDSegment.method:{method.replace('|', ' ').replace(':', ' ')}|",
            "Segment0_NameAutoGenerated": "0",
        }
        for key, value in fields.items():
            image.SetMetaData(key, value)
        return _write_image(image, path)
    return write_image(path, mask, ijk_to_lps)


def write_image(path: str | os.PathLike, array: np.ndarray, ijk_to_lps: np.ndarray) -> Path:
    """Write a volume (a label map, or e.g. the saliency map) as NIfTI, NRRD or MHA, keeping the geometry.

    The file is written to a temporary name and renamed, so a failure leaves no partial file.
    """
    path = Path(path)
    if output_type_error(path, LABEL_SUFFIXES, "output"):
        raise InputError(f"Unsupported output type {path.name}; use .seg.nrrd, .nii.gz, .nrrd or .mha.")
    return _write_image(to_sitk(np.asarray(array), ijk_to_lps), path)


def _write_image(image, path: Path) -> Path:
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path
