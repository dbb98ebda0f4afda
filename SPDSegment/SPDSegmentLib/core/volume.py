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
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .files import IncompleteOutput, atomic_write, format_bytes, output_failure, register_verifier
from .integrity import check_image_file, find_damage

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
    # what the reader accepted although it is doubtful (a DICOM series with gaps, when allowed): the CLI prints
    # them as warnings, and ``--strict`` fails on them
    warnings: List[str] = field(default_factory=list, repr=False, compare=False)

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


def read(path: str | os.PathLike, allow_slice_gaps: bool = False) -> Volume:
    """Read NIfTI, NRRD, MHA (a file) or a DICOM series (a folder) keeping the geometry.

    Refused with InputError, before any voxel is allocated: a damaged file (``integrity``: a truncated or
    corrupt stream, fewer voxels than the header declares), an image larger than the memory available, and a
    DICOM series whose slices are missing or unevenly spaced (read as one evenly spaced volume, its slices
    would be misplaced). ``allow_slice_gaps`` reads such a series anyway, with a warning in
    ``Volume.warnings`` (setting ``allow_slice_gaps``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Image not found: {path}")
    warnings: List[str] = []
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"No DICOM series found in folder {path}.")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            gap = series_gap(files)
            if gap and not allow_slice_gaps:
                raise InputError(f"The DICOM series in {path} {gap}. Reading it as one evenly spaced volume would "
                                 "misplace its slices. Export the complete series again, or accept the gaps "
                                 "explicitly; nothing was segmented.", setting="allow_slice_gaps")
            if gap:
                warnings.append(f"The DICOM series in {path} {gap}; it was read as evenly spaced, as asked, so "
                                "positions between the gaps are off by up to half the gap.")
            check_memory(path, _declared(files[0], len(files)))
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            check_memory(path, _declared(path))
            check_image_file(path)  # a truncated or corrupt file is refused (ITK would zero-fill some)
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"Cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from exc
    name = path.name.split(".")[0]
    volume = from_sitk(image, name=name)
    volume.warnings = warnings
    return volume


def _declared(path, slices: int = 1) -> Optional[Tuple[Tuple[int, ...], str, int]]:
    """(size, pixel type, bytes) a header declares (a DICOM file's times ``slices``), read without the voxels;
    None when SimpleITK cannot read the header (the full read then says why)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = tuple(int(s) for s in reader.GetSize())
    if slices > 1:  # one file of a series: its rows and columns, times the files
        size = size[:2] + (slices,)
    try:
        item = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    except RuntimeError:
        return None
    count = _product(size) * reader.GetNumberOfComponents()
    return size, sitk.GetPixelIDValueAsString(reader.GetPixelID()), count * item


def _product(values) -> int:
    count = 1
    for v in values:
        count *= int(v)
    return count


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (psutil), or None when it cannot be known."""
    try:
        import psutil  # a declared dependency; Slicer's Python may lack it until SPD's dependencies are installed
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(path, declared) -> None:
    """InputError when an image's header declares more voxel bytes than the memory available."""
    if declared is None:
        return
    size, pixel, count = declared
    available = available_memory()
    if available is not None and count > available:
        raise InputError(f"Image {path} declares {' x '.join(map(str, size))} voxels of {pixel} "
                         f"({format_bytes(count)}), more than the {format_bytes(available)} of memory available "
                         "on this machine. Crop or downsample it first (or close other programs); nothing was "
                         "segmented.")


def series_gap(files) -> Optional[str]:
    """Why a DICOM series' slices are not evenly spaced (missing slices, duplicates, uneven spacing), or None.

    Positions are the files' ImagePositionPatient along the slice normal (from ImageOrientationPatient);
    spacings that differ from the typical one by more than 10 % (and 0.01 mm) are a gap."""
    if len(files) < 3:
        return None
    positions = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(name))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None  # the series read says what is wrong
        direction = np.asarray(reader.GetDirection(), float).reshape(3, 3)
        positions.append(float(np.dot(direction[:, 2], reader.GetOrigin())))
    order = np.argsort(positions)
    steps = np.diff(np.asarray(positions)[order])
    typical = float(np.median(steps))
    if typical <= 1e-6:
        return "holds several files at one slice position"
    odd = np.flatnonzero(np.abs(steps - typical) > max(0.01, 0.1 * typical))
    if not len(odd):
        return None
    k = int(odd[np.argmax(np.abs(steps[odd] - typical))])
    before, after = Path(files[order[k]]).name, Path(files[order[k + 1]]).name
    step = float(steps[k])
    if step > typical:
        missing = int(round(step / typical)) - 1
        what = f"{missing} slice{'s' if missing != 1 else ''} missing" if missing >= 1 else "uneven spacing"
    else:
        what = "a slice closer than the others" if step > 1e-6 else "two files at one position"
    return (f"has unevenly spaced slices: between {before} and {after} the position steps {step:.2f} mm where "
            f"the slices are {typical:.2f} mm apart ({what}; {len(odd)} uneven step{'s' if len(odd) > 1 else ''})")


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
        return _write_image(image, path, mask)
    return write_image(path, mask, ijk_to_lps)


def write_image(path: str | os.PathLike, array: np.ndarray, ijk_to_lps: np.ndarray) -> Path:
    """Write a volume (a label map, or e.g. the saliency map) as NIfTI, NRRD or MHA, keeping the geometry.

    The file is written to a temporary name, read back (:func:`verify_image`) and renamed, so a failure leaves
    no partial file and the file it would replace as it was.
    """
    path = Path(path)
    if output_type_error(path, LABEL_SUFFIXES, "output"):
        raise InputError(f"Unsupported output type {path.name}; use .seg.nrrd, .nii.gz, .nrrd or .mha.")
    array = np.asarray(array)
    return _write_image(to_sitk(array, ijk_to_lps), path, array)


def voxel_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's shape, type and voxels: what a written mask must read back as."""
    digest = hashlib.sha256(f"{tuple(array.shape)}|{np.dtype(array.dtype).str}|".encode())
    digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def verify_image(path: os.PathLike, shape: Optional[Tuple[int, ...]] = None, digest: Optional[str] = None) -> None:
    """Read a written image back enough to prove it whole (files.IncompleteOutput otherwise): its streams and
    voxel bytes (``integrity``), its header's size (``shape``, (k, j, i)) and, given ``digest``
    (:func:`voxel_digest`), its voxels. SimpleITK's writers do not report a short write; this does."""
    damage = find_damage(Path(path))
    if damage:
        raise IncompleteOutput(damage)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        size = tuple(reversed(reader.GetSize()))
        if shape is not None and size != tuple(shape):
            raise IncompleteOutput(f"its header says {size} voxels, {tuple(shape)} were written")
        if digest is not None:
            image = reader.Execute()  # held while its array view is read
            if voxel_digest(sitk.GetArrayViewFromImage(image)) != digest:
                raise IncompleteOutput("its voxels differ from the mask that was written")
    except RuntimeError as exc:
        raise IncompleteOutput(f"it cannot be read ({str(exc).strip().splitlines()[-1][:200]})") from None


def _write_image(image, path: Path, array: np.ndarray) -> Path:
    """Write, read back and rename. Masks and label maps (integer voxels) are compared voxel for voxel by
    digest; other volumes (saliency maps, float) by header and complete, CRC-checked compressed stream."""
    digest = voxel_digest(array) if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else None
    try:
        with atomic_write(path, verify=lambda tmp: verify_image(tmp, array.shape, digest)) as tmp:
            sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as exc:  # ITK's writer: a folder that vanished, a failed open or write
        raise output_failure(path, f"the image writer failed ({str(exc).strip().splitlines()[-1][:200]})") from exc
    return path


register_verifier(SEGMENTATION_SUFFIXES + LABEL_SUFFIXES, verify_image)  # files written without a known array
