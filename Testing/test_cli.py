"""The ``spd`` command line, in-process: outputs, summaries, and clean refusals that write nothing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import files_in, run, segment_args

from SPDSegmentLib import cli
from SPDSegmentLib.core import prompts
from SPDSegmentLib.core import spd_model
from SPDSegmentLib.core import volume as vol
from SPDSegmentLib.core.saliency import SaliencyHead


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # 2-core machines: no oversubscription


@pytest.fixture(scope="module")
def sample_volume(sample_paths):
    return vol.read(sample_paths["image"])


@pytest.fixture(scope="module")
def spd_file(tmp_path_factory, tiny_backbone):
    """An SPD model on the tiny backbone whose saliency is high everywhere (every click is kept)."""
    torch.manual_seed(0)
    head = SaliencyHead(tiny_backbone.embed_dim, 8)
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.fill_(4.0)
    header = spd_model.make_header(tiny_backbone, head, lora_rank=0, tau=0.5, neighbours=1, decoder_tuned=False)
    return spd_model.save(tmp_path_factory.mktemp("models") / "tiny.spd.safetensors", tiny_backbone, head, header)


# ---------------------------------------------------------------- models

def test_models_lists_the_catalogue(capsys):
    code, out, err = run(capsys, "models")
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert "litemedsam" in names and "tiny_sam_test" in names and "spd-hippocampus" in names
    tiny = next(line for line in out.splitlines() if line.startswith("tiny_sam_test"))
    assert " yes " in tiny and "64" in tiny
    code, verbose, _ = run(capsys, "models", "-v")
    assert code == 0 and "licence" in verbose


# ---------------------------------------------------------------- segment

def test_segment_raw_writes_a_segmentation(capsys, sample_paths, sample_volume, tmp_path):
    out = tmp_path / "x.seg.nrrd"
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out,
                                                  "--mode", "raw", "--segment-name", "hippocampus"))
    assert code == 0, err
    assert out.exists() and files_in(tmp_path) == ["x.seg.nrrd"]
    image = sitk.ReadImage(str(out))
    mask = sitk.GetArrayFromImage(image)
    assert mask.shape == sample_volume.shape
    np.testing.assert_allclose(image.GetSpacing(), sample_volume.spacing)
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("raw:") and "slices" in summary and "voxels" in summary and str(out) in summary
    assert "; axis: coronal slices (array axis 1): the clicks lie on its slice planes -> " in summary
    voxels = int(summary.split(" voxels")[0].split()[-1])
    assert voxels == int((mask > 0).sum()) > 0
    assert image.GetMetaData("Segment0_Name") == "hippocampus"


def test_written_segmentation_loads_in_slicer(capsys, sample_paths, sample_volume, tmp_path):
    slicer = pytest.importorskip("slicer")
    out = tmp_path / "x.seg.nrrd"
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, "--mode", "raw",
                                             "--segment-name", "hippocampus"))
    assert code == 0, err
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "hippocampus"
    labelmap = segment.GetRepresentation("Binary labelmap")
    assert labelmap is not None
    extent = labelmap.GetExtent()
    assert extent[0] <= extent[1]  # not empty
    assert all(0 <= extent[2 * a] and extent[2 * a + 1] < sample_volume.shape[2 - a] for a in range(3))


def test_segment_with_an_spd_model_writes_every_output(capsys, sample_paths, sample_volume, spd_file, tmp_path):
    out, label_out = tmp_path / "x.seg.nrrd", tmp_path / "x_label.nii.gz"
    audit_out, saliency_out = tmp_path / "audit.mrk.json", tmp_path / "saliency.nii.gz"
    code, stdout, err = run(capsys, *segment_args(
        sample_paths["image"], sample_paths["points"], out, "--axis", "coronal", "--label-out", label_out,
        "--audit-out", audit_out, "--saliency-out", saliency_out, model=spd_file))
    assert code == 0, err
    assert files_in(tmp_path) == sorted(p.name for p in (out, label_out, audit_out, saliency_out))
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("spd:") and "prompts kept" in summary and "borrowed" in summary
    assert "axis: coronal slices (array axis 1), as given -> " in summary
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_out)))
    assert label.shape == seg.shape == sample_volume.shape
    np.testing.assert_array_equal(label > 0, seg > 0)
    saliency = sitk.ReadImage(str(saliency_out))
    values = sitk.GetArrayFromImage(saliency)
    assert values.shape == sample_volume.shape and values.dtype == np.float32
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.5
    # the audit: every click once as kept (saliency is high everywhere) at its own position, plus borrowings
    clicks = prompts.read(sample_paths["points"])
    audit = json.loads(audit_out.read_text())["markups"][0]["controlPoints"]
    descriptions = [p["description"] for p in audit]
    kept = [p for p in audit if p["description"].startswith("kept")]
    assert len(kept) == len(clicks)
    assert all(d.split()[0] in ("kept", "rejected", "borrowed") for d in descriptions)
    assert any(d.startswith("borrowed") for d in descriptions)
    assert f"kept {len(kept)} rejected 0" in summary
    kept_lps = np.array([p["position"] for p in kept])
    distance = np.linalg.norm(kept_lps[:, None] - clicks.lps[None], axis=2).min(axis=1)
    assert distance.max() < 0.1  # millimetres: the audit sits where the clicks were


def ijk_csv(path, ijk):
    path.write_text("i,j,k\n" + "".join(f"{i:g},{j:g},{k:g}\n" for i, j, k in ijk))
    return path


def test_segment_axis_from_voxel_centre_clicks(capsys, sample_paths, sample_volume, tiny_backbone, tmp_path):
    """Clicks at voxel centres fit every axis's planes: the summary says the clicks' geometry chose, or the
    model's trained orientation in a close call."""
    from SPDSegmentLib.research.simulate import simulate

    label = vol.read_label(sample_paths["label"], like=sample_volume)
    clean = simulate((label > 0).astype("uint8"), 1, "clean", seed=0).ijk
    assert np.all(clean == np.round(clean))
    points = ijk_csv(tmp_path / "centre.csv", clean)
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], points, tmp_path / "a.seg.nrrd", "--mode",
                                                  "raw"))
    assert code == 0, err
    summary = stdout.strip().splitlines()[-1]
    assert "axis: coronal slices (array axis 1) from the clicks' geometry (clicks on " in summary

    diagonal = ijk_csv(tmp_path / "diagonal.csv", [(8 + s, 15 + s, 17) for s in range(16)])  # i and j alike
    head = SaliencyHead(tiny_backbone.embed_dim, 8)
    header = spd_model.make_header(tiny_backbone, head, lora_rank=0, tau=0.5, neighbours=1, decoder_tuned=False,
                                   views=["sagittal"])
    model = spd_model.save(tmp_path / "models" / "sagittal.spd.safetensors", tiny_backbone, head, header)
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], diagonal, tmp_path / "b.seg.nrrd",
                                                  "--mode", "raw", model=model))
    assert code == 0, err
    summary = stdout.strip().splitlines()[-1]
    assert "axis: sagittal slices (array axis 2): the clicks' geometry is a close call" in summary
    assert "the model was trained on sagittal slices" in summary
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], diagonal, tmp_path / "c.seg.nrrd",
                                                  "--mode", "raw"))  # a plain backbone: a tie, said so
    assert code == 0, err
    assert "axis: coronal slices (array axis 1): a tie in the clicks' geometry" in stdout


def test_segment_default_output_name(capsys, sample_paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "segment", sample_paths["image"], "--points", sample_paths["points"], "--model",
                       "tiny_sam_test", "--mode", "raw", "--quiet", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "hippocampus_001_image_spd.seg.nrrd").exists()


# ---------------------------------------------------------------- refusals: exit code 2, nothing written

def empty_point_list(path):
    path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": []}]}))
    return path


def shifted_points(src, path, offset=1000.0):
    data = json.loads(src.read_text())
    for markup in data["markups"]:
        for point in markup.get("controlPoints", []):
            point["position"] = [v + offset for v in point["position"]]
    path.write_text(json.dumps(data))
    return path


def image_2d(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.float32)), str(path))
    return path


def image_4d(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 10, 12, 14), np.float32), isVector=False), str(path))
    return path


def nan_image(path, sample_volume, value=np.nan):
    """NRRD / MHA keep NaN (ITK's NIfTI reader turns NaN into 0, so a .nii.gz would not do)."""
    array = sample_volume.array.astype(np.float32)
    array[3, 4, 5] = value
    sitk.WriteImage(vol.to_sitk(array, sample_volume.ijk_to_lps), str(path))
    return path


def garbage(path, content=b"this is not what it claims to be\x00\x01\x02" * 50):
    path.write_bytes(content)
    return path


BAD_INPUTS = {
    "no points": (lambda d, s, v: (s["image"], empty_point_list(d / "empty.mrk.json"), "tiny_sam_test"),
                  "no placed points"),
    "points outside": (lambda d, s, v: (s["image"], shifted_points(s["points"], d / "far.mrk.json"),
                                        "tiny_sam_test"), "outside the image"),
    "2D image": (lambda d, s, v: (image_2d(d / "flat.nii.gz"), s["points"], "tiny_sam_test"), "dimensions"),
    "4D image": (lambda d, s, v: (image_4d(d / "series.nii.gz"), s["points"], "tiny_sam_test"), "4 dimensions"),
    "NaN voxels": (lambda d, s, v: (nan_image(d / "nan.nrrd", v), s["points"], "tiny_sam_test"), "NaN"),
    "infinite voxels": (lambda d, s, v: (nan_image(d / "inf.mha", v, np.inf), s["points"], "tiny_sam_test"),
                        "infinite"),
    "unreadable image": (lambda d, s, v: (garbage(d / "broken.nii.gz"), s["points"], "tiny_sam_test"),
                         "Cannot read image"),
    "missing image": (lambda d, s, v: (d / "nope.nii.gz", s["points"], "tiny_sam_test"), "not found"),
    "wrong checkpoint": (lambda d, s, v: (s["image"], s["points"], garbage(d / "model.pth")),
                         "not a readable PyTorch checkpoint"),
    "wrong SPD model": (lambda d, s, v: (s["image"], s["points"], garbage(d / "model.spd.safetensors")),
                        "not a readable SPD model"),
    "unknown model": (lambda d, s, v: (s["image"], s["points"], "no_such_model"),
                      "not a known model nor an existing file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(capsys, sample_paths, sample_volume, tmp_path, case):
    make, expected = BAD_INPUTS[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, points, model = make(inputs, sample_paths, sample_volume)
    outputs = tmp_path / "out"
    outputs.mkdir()
    out = outputs / "x.seg.nrrd"
    before = files_in(inputs)
    code, stdout, err = run(capsys, *segment_args(image, points, out, "--mode", "raw", "--label-out",
                                                  outputs / "x.nii.gz", model=model))
    assert code == 2, (stdout, err)
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert files_in(outputs) == []  # no output, no partial file
    assert files_in(inputs) == before


def test_spd_mode_with_a_backbone_exits_2(capsys, sample_paths, tmp_path):
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd",
                                             "--mode", "spd"))
    assert code == 2 and "error: SPD mode needs an SPD model" in err
    assert files_in(tmp_path) == []


def test_unusable_runtime_exits_2(capsys, sample_paths, tmp_path, monkeypatch):
    from SPDSegmentLib.core.models import openvino_runtime

    monkeypatch.setattr(openvino_runtime, "available", lambda: False)  # as on a machine without OpenVINO
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd",
                                             "--mode", "raw", "--runtime", "openvino"))
    assert code == 2 and "pip install openvino" in err and err.rstrip().endswith("(option --runtime)")
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd",
                                             "--mode", "raw", "--runtime", "torch", "--precision", "int8"))
    assert code == 2 and "int8 precision runs on the CPU with OpenVINO" in err and "(option --precision)" in err
    assert "--" not in err.split("(option")[0]  # the core's message names no flag; the command line adds it
    assert files_in(tmp_path) == []


def test_unknown_window_preset_exits_2(capsys, sample_paths, tmp_path):
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd",
                                             "--mode", "raw", "--window", "liver"))
    assert code == 2 and "error: Unknown window preset 'liver'" in err
    assert files_in(tmp_path) == []


def test_unsupported_output_type_exits_2(capsys, sample_paths, tmp_path):
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.png",
                                             "--mode", "raw"))
    assert code == 2 and err.startswith("error: Unsupported --out file type")
    assert files_in(tmp_path) == []


def test_some_points_outside_warn_and_segment(capsys, sample_paths, tmp_path):
    data = json.loads(sample_paths["points"].read_text())
    points = data["markups"][0]["controlPoints"]
    far = json.loads(json.dumps(points[0]))
    far["position"] = [v + 1000.0 for v in far["position"]]
    points.append(far)
    path = tmp_path / "mixed.mrk.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "x.seg.nrrd"
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], path, out, "--mode", "raw"))
    assert code == 0 and out.exists()
    assert f"warning: 1 of {len(points)} points lie outside" in err


# ---------------------------------------------------------------- simulate

def test_simulate_writes_a_point_list(capsys, sample_paths, sample_volume, tmp_path):
    out = tmp_path / "clicks.mrk.json"
    code, stdout, err = run(capsys, "simulate", sample_paths["label"], "--axis", "1", "--level", "severe",
                            "--seed", "3", "--out", out)
    assert code == 0, err
    assert out.exists() and "severe" in stdout and str(out) in stdout
    clicks = prompts.read(out)
    assert len(clicks) > 5
    voxels = prompts.to_voxels(clicks, sample_volume, axis=1)
    assert len(voxels.outside_lps) == 0
    np.testing.assert_allclose(voxels.ijk[:, 1], np.round(voxels.ijk[:, 1]), atol=1e-6)  # on slice planes
    again = tmp_path / "again.mrk.json"
    assert cli.main(["simulate", str(sample_paths["label"]), "--axis", "1", "--level", "severe", "--seed", "3",
                     "--out", str(again)]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(prompts.read(again).lps, clicks.lps)


def test_simulate_missing_label_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "simulate", tmp_path / "nope.nii.gz", "--out", tmp_path / "c.mrk.json")
    assert code == 2 and err.startswith("error: Image not found")
    assert files_in(tmp_path) == []


def test_copied_sample_image_segments_like_the_original(capsys, sample_paths, tmp_path):
    """The summary depends on the content only, not on the file's location."""
    copy = tmp_path / "copy.nii.gz"
    shutil.copy(sample_paths["image"], copy)
    results = []
    for image, out in ((sample_paths["image"], tmp_path / "a.seg.nrrd"), (copy, tmp_path / "b.seg.nrrd")):
        code, _, err = run(capsys, *segment_args(image, sample_paths["points"], out, "--mode", "raw"))
        assert code == 0, err
        results.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    np.testing.assert_array_equal(results[0], results[1])
