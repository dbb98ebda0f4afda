"""volume: reading, geometry, intensity, slice <-> model coordinates, writing."""
from __future__ import annotations

import locale
import time

import numpy as np
import pytest
import SimpleITK as sitk

from SPDSegmentLib.core import volume as vol
from SPDSegmentLib.core.errors import InputError


def sitk_image(volume: vol.Volume, dtype=np.int16):
    return vol.to_sitk((volume.array * 1000).astype(dtype), volume.ijk_to_lps)


# ---------------------------------------------------------------- geometry

def test_ijk_lps_ras_round_trips(oblique_volume):
    rng = np.random.default_rng(1)
    ijk = rng.uniform(-0.5, 9.5, size=(20, 3))
    lps = vol.ijk_to_physical(ijk, oblique_volume.ijk_to_lps)
    np.testing.assert_allclose(vol.physical_to_ijk(lps, oblique_volume.ijk_to_lps), ijk, atol=1e-9)
    ras = vol.lps_to_ras(lps)
    np.testing.assert_allclose(ras[:, :2], -lps[:, :2])
    np.testing.assert_allclose(vol.ras_to_lps(ras), lps)
    np.testing.assert_allclose(vol.ijk_to_physical(ijk, oblique_volume.ijk_to_ras), ras, atol=1e-9)
    np.testing.assert_allclose(vol.physical_to_ijk(ras, oblique_volume.ijk_to_ras), ijk, atol=1e-9)
    np.testing.assert_allclose(oblique_volume.spacing, [0.8, 0.9, 2.0])


def test_geometry_agrees_with_simpleitk(oblique_volume):
    image = sitk_image(oblique_volume)
    for ijk in ([0, 0, 0], [9, 11, 5], [2.5, 7.25, 1.5]):
        expected = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
        np.testing.assert_allclose(vol.ijk_to_physical(ijk, oblique_volume.ijk_to_lps)[0], expected, atol=1e-9)
    again = vol.from_sitk(image)
    np.testing.assert_allclose(again.ijk_to_lps, oblique_volume.ijk_to_lps, atol=1e-12)
    assert again.shape == (6, 12, 10)


def test_input_is_not_modified_in_place(oblique_volume):
    array = oblique_volume.array.copy()
    ras = np.array([[1.0, 2.0, 3.0]])
    vol.ras_to_lps(ras)
    np.testing.assert_array_equal(ras, [[1.0, 2.0, 3.0]])
    vol.apply_range(oblique_volume.array, *vol.intensity_range(oblique_volume.array))
    np.testing.assert_array_equal(oblique_volume.array, array)


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_file_formats_keep_geometry(tmp_path, oblique_volume, suffix):
    image = sitk_image(oblique_volume)
    path = tmp_path / f"case{suffix}"
    sitk.WriteImage(image, str(path))
    volume = vol.read(path)
    assert volume.name == "case" and volume.shape == (6, 12, 10)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.ijk_to_lps, oblique_volume.ijk_to_lps, atol=1e-4)


def write_dicom_series(folder, volume: vol.Volume):
    """One file per k slice, with the tags a GDCM series reader needs to rebuild the geometry.

    GDCM's writer sets the C locale of the whole process (Python's text files would then be ASCII): restored."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(folder, volume)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder, volume: vol.Volume):
    image = sitk_image(volume)
    folder.mkdir()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(int(time.time()))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice2d = image[:, :, k]
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": series_uid + ".0", "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0010|0010": "Test^Patient", "0010|0020": "SPD0001",
            "0020|0037": "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7])),
            "0020|0032": "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": str(image.GetSpacing()[2]),
            "0028|1052": "0", "0028|1053": "1",  # rescale intercept / slope
        }
        for key, value in tags.items():
            slice2d.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice2d)
    return image


def test_read_dicom_series(tmp_path, oblique_volume):
    image = write_dicom_series(tmp_path / "dicom", oblique_volume)
    volume = vol.read(tmp_path / "dicom")
    assert volume.shape == (6, 12, 10)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.ijk_to_lps, oblique_volume.ijk_to_lps, atol=1e-4)


def test_read_rejects_unusable_images(tmp_path):
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="2 dimensions.*3D"):
        vol.read(tmp_path / "flat.nii.gz")
    frames = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "series.nii.gz"))
    with pytest.raises(InputError, match="4 dimensions.*time point"):
        vol.read(tmp_path / "series.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="3 components"):
        vol.read(tmp_path / "rgb.nrrd")
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3], array[0, 0, 0] = np.nan, np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="2 NaN or infinite"):
        vol.read(tmp_path / "nan.nrrd")


def test_read_rejects_garbage_and_missing(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(InputError, match="Cannot read image"):
        vol.read(tmp_path / "junk.nii.gz")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(InputError, match="No DICOM series"):
        vol.read(tmp_path / "empty_folder")
    with pytest.raises(InputError, match="not found"):
        vol.read(tmp_path / "missing.nrrd")


def test_read_label_checks_grid(tmp_path, oblique_volume):
    mask = (oblique_volume.array > 0.5).astype(np.uint8)
    sitk.WriteImage(vol.to_sitk(mask * 3, oblique_volume.ijk_to_lps), str(tmp_path / "label.nrrd"))
    np.testing.assert_array_equal(vol.read_label(tmp_path / "label.nrrd", like=oblique_volume), mask)
    other = vol.Volume(oblique_volume.array, vol.geometry_matrix((0, 0, 0), (1, 1, 1), np.eye(3).ravel()))
    with pytest.raises(InputError, match="does not match"):
        vol.read_label(tmp_path / "label.nrrd", like=other)


# ---------------------------------------------------------------- intensity

def normalised(array, **kwargs):
    return vol.apply_range(array, *vol.intensity_range(array, **kwargs))


def test_intensity_range_maps_to_unit_range_without_touching_input():
    rng = np.random.default_rng(2)
    for array in (rng.normal(300, 80, (4, 16, 16)).astype(np.int16), rng.random((4, 16, 16)).astype(np.float32)):
        before = array.copy()
        out = normalised(array)
        np.testing.assert_array_equal(array, before)
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0 and out.max() > out.min()
    constant = normalised(np.full((2, 3, 3), 7.0))
    assert np.isfinite(constant).all() and constant.min() >= 0 and constant.max() <= 1


def test_ct_window_presets():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0]).reshape(1, 1, 5)
    assert vol.intensity_range(hu, window="lung") == (-1350.0, 150.0)
    np.testing.assert_allclose(normalised(hu, window="lung").ravel(), [0, 0, 0.5, 1, 1], atol=1e-6)
    soft = normalised(np.array([-160.0, 40.0, 240.0]).reshape(1, 1, 3), modality="ct")
    np.testing.assert_allclose(soft.ravel(), [0, 0.5, 1], atol=1e-6)
    assert vol.intensity_range(hu, window=(40.0, 400.0)) == vol.intensity_range(hu, window="soft_tissue")
    with pytest.raises(InputError, match="Unknown window preset 'liver'"):
        vol.intensity_range(hu, window="liver")  # an InputError the command line reports, not a KeyError


# ---------------------------------------------------------------- slices

def test_slice_helpers():
    array = np.arange(60).reshape(3, 4, 5)
    assert vol.slice_axes(0) == (1, 2) and vol.slice_axes(1) == (0, 2) and vol.slice_axes(2) == (0, 1)
    np.testing.assert_array_equal(vol.get_slice(array, 1, 2), array[:, 2, :])
    out = np.zeros_like(array)
    vol.put_slice(out, 2, 4, np.ones((3, 4)))
    assert out[:, :, 4].sum() == 12 and out.sum() == 12


# ---------------------------------------------------------------- writing

def test_write_segmentation_seg_nrrd(tmp_path, oblique_volume):
    mask = (oblique_volume.array > 0.7).astype(np.uint8)
    path = vol.write_segmentation(tmp_path / "out" / "case.seg.nrrd", mask, oblique_volume.ijk_to_lps,
                                  segment_name="Hippocampus", color=(0.1, 0.5, 1.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["case.seg.nrrd"]
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mask)
    again = vol.from_sitk(image)
    np.testing.assert_allclose(again.ijk_to_lps, oblique_volume.ijk_to_lps, atol=1e-6)
    assert image.GetMetaData("Segment0_Name") == "Hippocampus"
    assert image.GetMetaData("Segment0_Color") == "0.1 0.5 1"
    assert image.GetMetaData("Segment0_LabelValue") == "1"
    assert image.GetMetaData("Segment0_Extent") == "0 9 0 11 0 5"
    assert image.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"


@pytest.mark.parametrize("name", ["case.nii.gz", "case.nrrd", "case.mha"])
def test_write_label_maps(tmp_path, oblique_volume, name):
    mask = (oblique_volume.array > 0.3).astype(np.uint8)
    path = vol.write_segmentation(tmp_path / name, mask, oblique_volume.ijk_to_lps)
    back = vol.read(path)
    np.testing.assert_array_equal(back.array, mask)
    np.testing.assert_allclose(back.ijk_to_lps, oblique_volume.ijk_to_lps, atol=1e-4)


def test_failed_write_leaves_nothing(tmp_path, oblique_volume):
    mask = np.zeros(oblique_volume.shape, np.uint8)
    with pytest.raises(InputError, match="Unsupported output"):
        vol.write_segmentation(tmp_path / "case.png", mask, oblique_volume.ijk_to_lps)
    (tmp_path / "taken.seg.nrrd").mkdir()  # a folder in the way: the final rename fails
    with pytest.raises(InputError, match="Could not write .*taken.seg.nrrd.*nothing was written"):
        vol.write_segmentation(tmp_path / "taken.seg.nrrd", mask, oblique_volume.ijk_to_lps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.seg.nrrd"]
    assert not any((tmp_path / "taken.seg.nrrd").iterdir())


def test_fingerprint(oblique_volume):
    key = oblique_volume.fingerprint()
    assert key == vol.Volume(oblique_volume.array.copy(), oblique_volume.ijk_to_lps.copy()).fingerprint()
    moved = oblique_volume.ijk_to_lps.copy()
    moved[0, 3] += 1.0
    assert vol.Volume(oblique_volume.array, moved).fingerprint() != key


def test_fingerprint_hashes_the_voxels_of_a_read_only_array_once(oblique_volume, monkeypatch):
    writable = vol.Volume(oblique_volume.array.copy(), oblique_volume.ijk_to_lps.copy())
    key = writable.fingerprint()
    writable.array[0, 0, 0] += 1  # a writable array may change in place: hashed on every call
    assert writable.fingerprint() != key
    frozen_array = oblique_volume.array.copy()
    frozen_array.flags.writeable = False
    frozen = vol.Volume(frozen_array, oblique_volume.ijk_to_lps.copy())
    assert frozen.fingerprint() == key
    calls = []
    real_sha256 = vol.hashlib.sha256
    monkeypatch.setattr(vol.hashlib, "sha256", lambda *a: calls.append(a) or real_sha256(*a))
    assert frozen.fingerprint() == key and len(calls) == 1 and calls[0]  # geometry only, seeded by the voxel hash
    frozen.ijk_to_lps[0, 3] += 1.0  # geometry is always hashed again
    assert frozen.fingerprint() != key
