"""Issue 22: the fault suite. Every fault a full disk or a hostile user can cause ends in a clear ``error:`` (exit 2)
or an explicit warning (exit 4 with ``--strict``), with no traceback, no hang, and no file the user had changed.

Sections: a full disk (simulated without root: ``RLIMIT_FSIZE`` in a child process, and injected writers that
write short or fail), outputs that would overwrite inputs, readers that would zero-fill or over-allocate, one
validation of every value, the engine's messages (with a seeded fuzz), and the cache.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import files_in, run, segment_args
from test_reliability import assert_refused, no_model_load, tiny_spd_file  # noqa: F401 (a fixture)

from SPDSegmentLib import cli
from SPDSegmentLib.core import files, spd_model
from SPDSegmentLib.core import volume as vol
from SPDSegmentLib.core.errors import InputError, SPDError
from SPDSegmentLib.core.models import registry

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def digests(folder) -> dict:
    """name -> SHA-256 of every file under ``folder`` (hidden temporaries included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def spd_file(tmp_path_factory, tiny_backbone):
    return tiny_spd_file(tmp_path_factory.mktemp("models") / "salient.spd.safetensors", tiny_backbone, 4.0)


@pytest.fixture()
def old_outputs(tmp_path):
    """A folder of earlier results the user keeps: every output name of a segment run, with known bytes."""
    folder = tmp_path / "results"
    folder.mkdir()
    names = {"--out": "case.seg.nrrd", "--label-out": "case.nii.gz", "--saliency-out": "saliency.nii.gz",
             "--audit-out": "audit.mrk.json"}
    for name in names.values():
        (folder / name).write_bytes(f"the user's earlier {name}".encode())
    return folder, {option: folder / name for option, name in names.items()}


def child_env(tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SPDSegment"), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               SPDSEGMENT_CACHE=str(tmp_path / "cache"))
    return env


def run_with_file_size_limit(limit: int, argv, tmp_path, script=None) -> subprocess.CompletedProcess:
    """``spd ARGV`` (or the Python ``script`` with ARGV) in a child process that may write no file larger than
    ``limit`` bytes: a full disk without root. SIGXFSZ is ignored there, so a write past the limit fails with
    EFBIG as on a full disk (or is cut short, which SimpleITK's writers do not report)."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = ["-c", script] if script else ["-m", "SPDSegmentLib.cli"]
    return subprocess.run([sys.executable, *command, *map(str, argv)], preexec_fn=limit_file_size,
                          capture_output=True, text=True, timeout=180, env=child_env(tmp_path), cwd=tmp_path)


def last_error(stderr: str) -> str:
    """The ``error:`` line (native libraries may print their own complaints before it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


needs_rlimit = pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE is POSIX only")


# ---------------------------------------------------------------- a full disk

@needs_rlimit
@pytest.mark.parametrize("limit", [1500, 6000])
def test_full_disk_leaves_every_earlier_output_byte_identical(limit, sample_paths, spd_file, old_outputs, tmp_path):
    """The issue's worst case: on a full disk `spd segment` printed success over a 0-byte file, and with
    --label-out and --saliency-out destroyed both earlier files. The limit cuts the first output (1500 bytes:
    its header; 6000: its voxels, silently)."""
    folder, outputs = old_outputs
    before = digests(folder)
    extra = [item for option in ("--label-out", "--saliency-out", "--audit-out") for item in (option, outputs[option])]
    result = run_with_file_size_limit(limit, segment_args(sample_paths["image"], sample_paths["points"],
                                                          outputs["--out"], "--runtime", "torch", *extra,
                                                          model=spd_file), tmp_path)
    error = last_error(result.stderr)
    assert result.returncode == cli.EXIT_INPUT, result.stderr
    assert "Could not write" in error and "free" in error and "nothing was written" in error, error
    assert digests(folder) == before  # every earlier file as it was, no temporary left
    assert "->" not in result.stdout


WRITE_EVERY_FORMAT = """
import sys
import numpy as np
from SPDSegmentLib.core import volume
from SPDSegmentLib.core.errors import InputError, SPDError

mask = np.zeros((40, 50, 60), np.uint8)
mask[5:35, 10:40, 20:50] = np.random.default_rng(0).random((30, 30, 30)) > 0.5  # compresses to ~12 KB
for name in sys.argv[1:]:
    try:
        volume.write_segmentation(name, mask, np.eye(4))
        print("written", name)
    except InputError as exc:
        print("error:", exc)
"""


@needs_rlimit
def test_full_disk_for_every_image_format(tmp_path):
    """SimpleITK's NIfTI writer never reports a short write, nor its NRRD writer for small files: the read-back
    does. Every file is larger than the 6000 bytes the child may write."""
    names = [tmp_path / f"label{suffix}" for suffix in (".seg.nrrd", ".nii", ".nii.gz", ".nrrd", ".mha")]
    for name in names:
        name.write_bytes(b"earlier result")
    result = run_with_file_size_limit(6000, names, tmp_path, script=WRITE_EVERY_FORMAT)
    assert "Traceback" not in result.stderr and result.returncode == 0, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(names), result.stdout
    for name, error in zip(names, errors):
        assert f"Could not write {name}" in error and "free" in error and "nothing was written" in error, error
        assert name.read_bytes() == b"earlier result"
    assert files_in(tmp_path) == sorted(n.name for n in names)


@needs_rlimit
def test_full_disk_for_simulated_clicks(sample_paths, tmp_path):
    out = tmp_path / "clicks.mrk.json"
    out.write_text("earlier clicks")
    result = run_with_file_size_limit(1000, ["simulate", sample_paths["label"], "--axis", "1", "--out", out], tmp_path)
    error = last_error(result.stderr)
    assert result.returncode == cli.EXIT_INPUT and "larger than this system or process allows" in error, error
    assert out.read_text() == "earlier clicks"


def cut_short(write):
    """A writer that loses the second half of every file it writes and says nothing, as SimpleITK does."""
    def short_write(image, name, *args, **kwargs):
        write(image, name, *args, **kwargs)
        with open(name, "r+b") as handle:
            handle.truncate(os.path.getsize(name) // 2)
    return short_write


@pytest.mark.parametrize("option", ["--out", "--label-out", "--saliency-out"])
def test_a_silent_short_write_is_caught_by_the_read_back(capsys, monkeypatch, option, sample_paths, spd_file,
                                                         old_outputs):
    folder, outputs = old_outputs
    before = digests(folder)
    real = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda image, name, *a, **k: (
        cut_short(real) if Path(name).name.endswith(outputs[option].name) else real)(image, name, *a, **k))
    extra = [item for o in ("--label-out", "--saliency-out", "--audit-out") for item in (o, outputs[o])]
    code, out, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], outputs["--out"],
                                               "--runtime", "torch", *extra, model=spd_file))
    assert_refused(code, err, f"Could not write {outputs[option]}", "read back incomplete", "free")
    assert digests(folder) == before and out == ""


def test_a_mask_that_reads_back_different_voxels_is_refused(monkeypatch, tmp_path, oblique_volume):
    """The digest: a file whose header and stream are fine but whose voxels are not the mask meant."""
    real = sitk.WriteImage

    def flip_a_voxel(image, name, *args, **kwargs):
        array = sitk.GetArrayFromImage(image)
        array.flat[0] ^= 1
        changed = sitk.GetImageFromArray(array)
        changed.CopyInformation(image)
        real(changed, name, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", flip_a_voxel)
    out = tmp_path / "mask.seg.nrrd"
    with pytest.raises(InputError, match="voxels differ from the mask"):
        vol.write_segmentation(out, np.zeros(oblique_volume.shape, np.uint8), oblique_volume.ijk_to_lps)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EFBIG, "file-size limit")])
def test_a_full_disk_reported_only_by_fsync_keeps_the_old_file(monkeypatch, tmp_path, code, words):
    """Delayed allocation (and NFS) report a full disk only when the data is flushed."""
    target = tmp_path / "clicks.mrk.json"
    target.write_text("old")

    def full(handle):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(InputError, match=f"Could not write {target}: .*{words}.*has .* free"):
        with files.atomic_write(target) as tmp:
            tmp.write_text("{}")
    assert target.read_text() == "old" and files_in(tmp_path) == ["clicks.mrk.json"]


def png_bytes() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def npy_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.arange(1000.0))
    return buffer.getvalue()


@pytest.mark.parametrize("name, whole", [("report.json", lambda: b'{"new": 1}'), ("plot.png", png_bytes),
                                         ("array.npy", npy_bytes)])
def test_an_empty_or_cut_output_is_never_renamed_into_place(tmp_path, name, whole):
    """The verifiers of files.py by kind: JSON parses, a PNG ends with its IEND chunk, a .npy holds what its
    header announces."""
    target = tmp_path / name
    target.write_bytes(b"the earlier file")
    data = whole()
    for content in (b"", data[: len(data) // 2], data[:-1]):
        with pytest.raises(InputError, match="read back incomplete"):
            with files.atomic_write(target) as tmp:
                tmp.write_bytes(content)
    assert target.read_bytes() == b"the earlier file" and files_in(tmp_path) == [name]
    with files.atomic_write(target) as tmp:
        tmp.write_bytes(data)
    assert target.read_bytes() == data


def test_output_set_reads_back_what_its_writers_did_not_seal(tmp_path):
    """A writer outside atomic_write (e.g. a CSV) is sealed by the commit; a file sealed by atomic_write is not
    read twice; a file that fails its check leaves every earlier output as it was."""
    calls = []
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text('"old a"')
    second.write_text('"old b"')
    with pytest.raises(InputError, match=f"Could not write {second}: it read back incomplete"):
        with files.OutputSet() as outputs:
            outputs.add(first).write_text('"new a"')
            outputs.add(second).write_text('{"cut')
    assert first.read_text() == '"old a"' and second.read_text() == '"old b"'
    with files.OutputSet() as outputs:
        with files.atomic_write(outputs.add(first, verify=lambda p: calls.append(("set", p)))) as tmp:
            tmp.write_text('"new a"')
        outputs.add(second, verify=lambda p: calls.append(("set", p))).write_text('"new b"')
    assert [kind for kind, _ in calls] == ["set"] and calls[0][1].name.endswith("b.json")
    assert first.read_text() == '"new a"' and files_in(tmp_path) == ["a.json", "b.json"]


def test_a_model_file_cut_short_keeps_the_earlier_model(monkeypatch, tmp_path, tiny_backbone, spd_file):
    target = tmp_path / "model.spd.safetensors"
    target.write_bytes(spd_file.read_bytes())
    before = target.read_bytes()
    real = spd_model.safetensors_bytes

    def short(tensors, metadata=None):  # the bytes written lose their last 100
        return real(tensors, metadata=metadata)[:-100]

    monkeypatch.setattr(spd_model, "safetensors_bytes", short)
    model = spd_model.load(spd_file, backbone=registry.load_backbone("tiny_sam_test"))
    with pytest.raises(InputError, match="Could not write .*model.spd.safetensors: it read back incomplete"):
        spd_model.save(target, model.backbone, model.head, model.header)
    assert target.read_bytes() == before and files_in(tmp_path) == ["model.spd.safetensors"]


def test_evaluation_reports_appear_together_or_not_at_all(monkeypatch, tmp_path):
    from SPDSegmentLib.research import evaluate

    rows = [{"dataset": "d", "case": "c", "axis": 0, "level": "moderate", "method": "spd", "dice": 0.8, "hd95": 1.0,
             "asd": 0.5, "seconds": 1.0}]
    (tmp_path / "per_case.csv").write_text("earlier rows")
    import matplotlib.figure

    def fail(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(InputError, match="the disk is full"):
        evaluate.write_reports(rows, evaluate.summarise(rows), tmp_path, {"command": "c", "machine": "m", "date": "d"})
    assert files_in(tmp_path) == ["per_case.csv"] and (tmp_path / "per_case.csv").read_text() == "earlier rows"


def test_a_disk_without_room_is_refused_before_any_model_loads(capsys, monkeypatch, no_model_load, sample_paths,
                                                               tmp_path):
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd"))
    assert_refused(code, err, "need about", "has 1.0 KB free", "nothing was computed")
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- outputs that are inputs

def links_to(target: Path, folder: Path, name: str, kind: str) -> Path:
    link = folder / name
    (os.symlink if kind == "symlink" else os.link)(target, link)
    return link


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_simulate_never_writes_over_its_label(capsys, sample_paths, tmp_path, kind):
    """`spd simulate LABEL --out LABEL` replaced the label with JSON."""
    label = tmp_path / "label.nii.gz"
    label.write_bytes(sample_paths["label"].read_bytes())
    before = digests(tmp_path)
    out = links_to(label, tmp_path, "clicks.mrk.json", kind)
    before = digests(tmp_path)
    code, _, err = run(capsys, "simulate", label, "--out", out)
    assert_refused(code, err, "--out file", "is an input of this command", "nothing was written")
    assert digests(tmp_path) == before
    code, _, err = run(capsys, "simulate", label, "--out", label)
    assert_refused(code, err, "Unsupported --out file type")


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_segment_never_writes_over_its_image_or_points(capsys, sample_paths, tmp_path, kind, no_model_load):
    image, points = tmp_path / "image.nii.gz", tmp_path / "clicks.mrk.json"
    image.write_bytes(sample_paths["image"].read_bytes())
    points.write_bytes(sample_paths["points"].read_bytes())
    out = links_to(image, tmp_path, "result.nii.gz", kind)
    audit = links_to(points, tmp_path, "audit.mrk.json", kind)
    before = digests(tmp_path)
    code, _, err = run(capsys, *segment_args(image, points, out))
    assert_refused(code, err, "--out file", "is an input")
    code, _, err = run(capsys, *segment_args(image, points, tmp_path / "new.seg.nrrd", "--audit-out", audit))
    assert_refused(code, err, "--audit-out file", "is an input")
    assert digests(tmp_path) == before


def test_train_never_writes_over_a_training_file(capsys, sample_paths, tmp_path, no_model_load):
    """`spd train --out` set to a training label replaced it with the model."""
    data = tmp_path / "Task01"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    (data / "imagesTr" / "case_001.nii.gz").write_bytes(sample_paths["image"].read_bytes())
    (data / "labelsTr" / "case_001.nii.gz").write_bytes(sample_paths["label"].read_bytes())
    before = digests(data)
    out = links_to(data / "labelsTr" / "case_001.nii.gz", tmp_path, "model.spd.safetensors", "symlink")
    code, _, err = run(capsys, "train", "--data", data, "--out", out, "--backbone", "tiny_sam_test")
    assert_refused(code, err, "model file", "is an input of this command", "case_001.nii.gz")
    code, _, err = run(capsys, "train", "--data", data, "--out", data / "labelsTr" / "case_001.nii.gz")
    assert_refused(code, err, "must end with .spd.safetensors", "(option --out)")
    assert digests(data) == before


def test_evaluate_never_writes_over_the_reports_it_merges(capsys, tmp_path):
    (tmp_path / "per_case.csv").write_text("earlier rows")
    code, _, err = run(capsys, "evaluate", "--models-dir", tmp_path, "--out-dir", tmp_path, "--merge",
                       tmp_path / "per_case.csv")
    assert_refused(code, err, "per_case.csv is an input")
    assert (tmp_path / "per_case.csv").read_text() == "earlier rows"


def test_demo_checks_its_folder_before_computing(capsys, tmp_path, no_model_load):
    """`spd demo --out-dir` unwritable failed after all the computation."""
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "demo", "--out-dir", blocker)
    assert_refused(code, err, "--out-dir folder", "is a file")
    code, _, err = run(capsys, "demo", "--out-dir", blocker / "below")
    assert_refused(code, err, "Cannot write", "is a file, not a folder")


def test_check_not_inputs_sees_folders_links_and_new_names(tmp_path):
    series = tmp_path / "dicom"
    series.mkdir()
    (series / "slice1.dcm").write_text("x")
    files.check_not_inputs({"out": tmp_path / "new.seg.nrrd", "none": None}, [series, None, tmp_path / "missing"])
    with pytest.raises(InputError, match="slice1.dcm is an input"):
        files.check_not_inputs({"out": series / "slice1.dcm"}, [series])
    os.symlink(series, tmp_path / "alias")
    with pytest.raises(InputError, match="by a link"):
        files.check_not_inputs({"out": tmp_path / "alias" / "slice1.dcm"}, [series])


# ---------------------------------------------------------------- readers that would zero-fill or over-allocate

def nrrd(header: str, data: bytes) -> bytes:
    return f"NRRD0004\n{header}\n\n".encode() + data


SHORT_IMAGES = {  # name -> (bytes, what the refusal says); each declares more voxels than it holds
    "zlib.mha": (b"ObjectType = Image\nNDims = 3\nDimSize = 1024 1024 1024\nElementType = MET_FLOAT\n"
                 b"CompressedData = True\nElementDataFile = LOCAL\n" + __import__("zlib").compress(b"\0" * 100),
                 "declares 4294967296 bytes of voxels but the file holds 100"),
    "raw.nrrd": (nrrd("type: float\ndimension: 3\nsizes: 1024 1024 1024\nencoding: raw\nendian: little", b"\0" * 999),
                 "declares 4294967296 bytes of voxels but the file holds 999"),
    "ascii.nrrd": (nrrd("type: short\ndimension: 3\nsizes: 1000 1000 1000\nencoding: ascii", b"1 2 3\n" * 100),
                   "declares 1000000000 voxel values but the file holds 300"),
    "gzip.nrrd": (nrrd("type: short\ndimension: 3\nsizes: 64 64 64\nencoding: gzip\nendian: little",
                       __import__("gzip").compress(b"\0" * 1000)), "declares 524288 bytes of voxels but the file holds 1000"),
    "bzip2.nrrd": (nrrd("type: short\ndimension: 3\nsizes: 64 64 64\nencoding: bzip2\nendian: little",
                        __import__("bz2").compress(b"\0" * 1000)), "declares 524288 bytes of voxels but the file holds 1000"),
}


@pytest.mark.parametrize("name", sorted(SHORT_IMAGES))
def test_images_holding_fewer_voxels_than_declared_are_refused(capsys, name, sample_paths, tmp_path, no_model_load):
    """A 247-byte compressed MetaImage was read as a zero-filled 4 GB volume and segmented with exit 0; raw and
    ASCII NRRD headers declaring 4 GB were allocated before the short read was noticed. Now each is refused
    from its header and size, before anything is allocated."""
    data, words = SHORT_IMAGES[name]
    image = tmp_path / name
    image.write_bytes(data)
    code, _, err = run(capsys, *segment_args(image, sample_paths["points"], tmp_path / "x.seg.nrrd", "--strict"))
    assert_refused(code, err, "is damaged", words, "nothing was segmented")
    assert files_in(tmp_path) == [name]


def test_an_image_larger_than_the_memory_is_refused_naming_both(capsys, monkeypatch, sample_paths, tmp_path):
    image = tmp_path / "huge.nrrd"
    image.write_bytes(nrrd("type: double\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\nendian: little",
                           b"\0" * 100))
    with pytest.raises(InputError, match=r"declares 100000 x 100000 x 100000 voxels of 64-bit float \(8000.0 TB\), "
                                         r"more than the .* of memory available"):
        vol.read(image)
    monkeypatch.setattr(vol, "available_memory", lambda: 10_000)
    with pytest.raises(InputError, match=r"35 x 51 x 35 voxels .* \(.* KB\), more than the 10.0 KB of memory"):
        vol.read(sample_paths["image"])


@pytest.fixture()
def dicom_series(tmp_path, oblique_volume):
    """A DICOM series of 6 evenly spaced slices, and a function that removes or moves one of them."""
    from test_volume import write_dicom_series

    folder = tmp_path / "dicom"
    write_dicom_series(folder, oblique_volume)
    return folder


def move_slice(path: Path, shift_mm: float) -> None:
    image = sitk.ReadImage(str(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    tags = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    position = [float(v) for v in tags["0020|0032"].split("\\")]
    position[2] += shift_mm
    tags["0020|0032"] = "\\".join(f"{v:.10f}" for v in position)
    for key, value in tags.items():
        image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.mark.parametrize("fault, words", [("missing", r"slice002.dcm and slice004.dcm .*\(1 slice missing"),
                                          ("moved", r"slice002.dcm and slice003.dcm .*\(a slice closer than")])
def test_a_dicom_series_with_a_gap_is_refused_unless_accepted(capsys, dicom_series, fault, words, tmp_path):
    """A series with one slice missing was read as evenly spaced, positions off by up to half a slice, and the
    only sign was ITK's raw warning."""
    if fault == "missing":
        (dicom_series / "slice003.dcm").unlink()
    else:
        move_slice(dicom_series / "slice003.dcm", -0.8)  # 2 mm spacing: 1.2 mm after slice 2, 2.8 mm before 4
    with pytest.raises(InputError, match=f"unevenly spaced slices: between {words}") as refused:
        vol.read(dicom_series)
    assert refused.value.setting == "allow_slice_gaps"
    accepted = vol.read(dicom_series, allow_slice_gaps=True)
    assert len(accepted.warnings) == 1 and "read as evenly spaced" in accepted.warnings[0]
    points = tmp_path / "click.csv"
    centre = vol.ijk_to_physical(np.array([[5.0, 6.0, 2.0]]), accepted.ijk_to_lps)[0]
    points.write_text("# coordinates: lps\nx,y,z\n" + ",".join(f"{v:.3f}" for v in centre) + "\n")
    out = tmp_path / "out" / "x.seg.nrrd"
    code, _, err = run(capsys, *segment_args(dicom_series, points, out, "--mode", "raw"))
    assert_refused(code, err, "unevenly spaced", "(option --allow-slice-gaps)")
    code, _, err = run(capsys, *segment_args(dicom_series, points, out, "--mode", "raw", "--allow-slice-gaps",
                                             "--strict"))
    assert code == cli.EXIT_IMPLAUSIBLE and "warning: The DICOM series" in err and "--strict" in err, err
    assert not out.exists()
    code, _, err = run(capsys, *segment_args(dicom_series, points, out, "--mode", "raw", "--runtime", "torch",
                                             "--allow-slice-gaps"))
    assert code == 0 and "warning: The DICOM series" in err and out.exists(), err


# ---------------------------------------------------------------- one validation for every value

class within:
    """Fail instead of hanging: a TimeoutError after ``seconds`` (POSIX interval timer)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        def expire(*_):
            raise TimeoutError(f"still running after {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)
        return False


def spd_file_with(path, backbone, **header_changes):
    """A tiny SPD model file whose header holds the given values (saved with a valid digest)."""
    from SPDSegmentLib.core.saliency import SaliencyHead

    head = SaliencyHead(backbone.embed_dim, 8)
    header = spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=1, decoder_tuned=False)
    header.update(header_changes)
    return spd_model.save(path, backbone, head, header)


def test_a_billion_neighbours_are_bounded_by_the_volume(capsys, sample_paths, spd_file, tiny_backbone, tmp_path):
    """`--neighbours 1000000000`, or a model header holding it, looped without end."""
    with within(60):
        code, out, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "a.seg.nrrd",
                                                   "--runtime", "torch", "--neighbours", "1000000000", model=spd_file))
        assert code == 0, err
        code, out_all, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                                       tmp_path / "b.seg.nrrd", "--runtime", "torch", "--neighbours",
                                                       "50", model=spd_file))
        assert code == 0, err
        header_model = spd_file_with(tmp_path / "n.spd.safetensors", tiny_backbone, neighbours=10 ** 9)
        code, out_header, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                                          tmp_path / "c.seg.nrrd", "--runtime", "torch",
                                                          model=header_model))
        assert code == 0, err
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n))) for n in ("a.seg.nrrd", "b.seg.nrrd"))
    np.testing.assert_array_equal(a, b)  # 50 reaches every slice of this 35-51-35 volume too


@pytest.mark.parametrize("change, field", [({"tau": 1.5}, "tau is 1.5"), ({"neighbours": -3}, "n is -3"),
                                           ({"fusion": "half"}, "fusion is 'half'"),
                                           ({"decoder_prompt": "mask"}, "decoder prompt 'mask'"),
                                           ({"head": {"type": "context", "hidden": 8, "blocks": 1,
                                                      "context": 10 ** 9, "image": False}}, "head_context is"),
                                           ({"lora_rank": -1}, "lora_rank is"), ({"views": "axial"}, "views is"),
                                           ({"decoder_tuned": "yes"}, "decoder_tuned is")])
def test_header_values_out_of_range_are_refused_on_load_naming_the_field(capsys, change, field, sample_paths,
                                                                        tiny_backbone, tmp_path):
    path = spd_file_with(tmp_path / "edited.spd.safetensors", tiny_backbone, **change)
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd",
                                             "--runtime", "torch", model=path))
    assert_refused(code, err, "header value out of range", field, "(option --model)")
    assert files_in(tmp_path) == ["edited.spd.safetensors"]


@pytest.fixture(scope="module")
def small_msd(tmp_path_factory):
    from test_train import make_msd

    return make_msd(tmp_path_factory.mktemp("msd") / "Task99_Faults", sample=False)


@pytest.mark.parametrize("argv, option", [
    (["segment", "IMAGE", "--points", "POINTS", "--device", "tpu"], "--device"),
    (["demo", "--device", "cuda:x"], "--device"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--device", "tpu"], "--device"),
    (["evaluate", "--models-dir", ".", "--device", "gpu"], "--device"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--stage1-lr", "nan"], "--stage1-lr"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--stage2-lr", "inf"], "--stage2-lr"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--psc-weight", "nan"], "--psc-weight"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--stage1-epochs", "-1"], "--stage1-epochs"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--tau", "nan"], "--tau"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--head-context", "1000000000"], "--head-context"),
    (["train", "--data", "DATA", "--out", "m.spd.safetensors", "--neighbours", "-1"], "--neighbours"),
    (["train", "--data", "DATA", "--out", "locked/below/m.spd.safetensors"], "Cannot write the model file"),
])
def test_bad_values_are_refused_before_anything_loads(capsys, argv, option, sample_paths, small_msd, tmp_path,
                                                      no_model_load, monkeypatch):
    """`--device tpu` ended in a traceback; `--stage1-lr nan` crashed after the encoding; `--psc-weight nan`
    trained and saved NaN weights; an unwritable `--out` failed after stage 1."""
    (tmp_path / "locked").write_text("a file where a folder should be")
    monkeypatch.chdir(tmp_path)
    names = {"IMAGE": sample_paths["image"], "POINTS": sample_paths["points"], "DATA": small_msd}
    code, _, err = run(capsys, *[names.get(a, a) for a in argv])
    assert_refused(code, err, option)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


def test_the_engine_refuses_an_unknown_device_before_loading(no_model_load):
    from SPDSegmentLib.engine import protocol
    from SPDSegmentLib.engine.server import Engine

    with pytest.raises(SPDError, match="Unknown device 'tpu'") as refused:
        Engine().handle(protocol.LoadModel(model="tiny_sam_test", device="tpu"))
    assert refused.value.setting == "device"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.mark.parametrize("stage, words", [("stage 1", "--stage1-lr"), ("stage 2", "psc_weight")])
def test_a_diverging_loss_stops_training_and_saves_nothing(capsys, monkeypatch, small_msd, store, tmp_path, stage,
                                                           words):
    """`--psc-weight nan` trained, reported success and saved NaN weights; a loss that becomes NaN now stops."""
    from test_train import config
    from SPDSegmentLib.research import train as T

    name = "dice_focal_loss" if stage == "stage 1" else "spd_stage2_loss"
    real = getattr(T, name)
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        if len(calls) < 2:
            return value
        return (value[0] * float("nan"), value[1]) if isinstance(value, tuple) else value * float("nan")

    monkeypatch.setattr(T, name, diverging)
    monkeypatch.setenv("SPDSEGMENT_RUNTIME", "torch")  # encode the store eagerly: no OpenVINO conversion to wait for
    out = tmp_path / "model.spd.safetensors"
    out.write_bytes(b"the user's earlier model")
    cfg = config(small_msd, out, cache_dir=str(store), stage1_epochs=2, stage2_steps=3)
    with pytest.raises(T.TrainingDiverged, match=f"Training diverged in {stage} at step 2 .*loss became nan"):
        T.train(cfg)
    assert out.read_bytes() == b"the user's earlier model"
    calls.clear()
    code, _, err = run(capsys, "train", "--data", small_msd, "--out", out, "--backbone", "tiny_sam_test", "--device",
                       "cpu", "--cache-dir", store, "--axes", "1", "--stage1-epochs", "2", "--stage1-lr", "0.01",
                       "--stage2-steps", "3", "--head-hidden", "8", "--head-blocks", "1", "--prompt-seeds", "1")
    assert code == cli.EXIT_INPUT and "Traceback" not in err and "error: Training diverged" in err, err
    assert words in err and "nothing was saved" in err and out.read_bytes() == b"the user's earlier model"


def test_nan_weights_are_never_saved(tiny_backbone, tmp_path):
    import torch
    from SPDSegmentLib.core.saliency import SaliencyHead

    head = SaliencyHead(tiny_backbone.embed_dim, 8)
    with torch.no_grad():
        head.net[-1].bias.fill_(float("nan"))
    header = spd_model.make_header(tiny_backbone, head, lora_rank=0, tau=0.5, neighbours=1, decoder_tuned=False)
    with pytest.raises(SPDError, match="Not saving m.spd.safetensors: .*NaN or infinite.*diverged"):
        spd_model.save(tmp_path / "m.spd.safetensors", tiny_backbone, head, header)
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- the engine

class Replies:
    """The engine's output stream, in memory: every message it sent, parsed."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        pass

    def messages(self) -> list:
        import json

        return [json.loads(line) for line in self.data.splitlines() if line.strip()]


@pytest.fixture()
def server(tmp_path):
    """An engine server in this process, past its hello, with its private folder; ``serve_queued()`` runs the
    queued jobs as its main thread would."""
    from SPDSegmentLib.core.cache import EmbeddingCache
    from SPDSegmentLib.engine import protocol
    from SPDSegmentLib.engine.server import Engine, Server

    share = tmp_path / "share"
    share.mkdir(mode=0o700)
    replies = Replies()
    server = Server(Engine(cache=EmbeddingCache()), replies, str(share), "token")
    server.take(protocol.dumps({"type": "hello", "token": "token"}))
    server.replies, server.share = replies, share

    def serve_queued():
        while server._jobs:
            server._run(server._jobs.popleft())

    server.serve_queued = serve_queued
    return server


def request_line(request_id, kind, body) -> bytes:
    from SPDSegmentLib.engine import protocol

    return protocol.dumps({"type": "request", "id": request_id, "kind": kind, "body": body})


def test_malformed_messages_get_error_replies_and_the_engine_stays_responsive(server):
    """A request without an id killed the reader thread: the engine went deaf and no longer exited with its
    stdin. Each of these now gets one error reply, and a status request after them is answered."""
    from SPDSegmentLib.engine import protocol

    bad = [b"not json", b"[1, 2, 3]", b'"a string"', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
           protocol.dumps({"type": "request", "kind": "segment", "body": {}}),  # no id
           protocol.dumps({"type": "request", "id": [1], "kind": "status"}),  # an id that is not a scalar
           protocol.dumps({"type": "cancel"}), protocol.dumps({"type": "request", "id": 3, "kind": ["segment"]}),
           protocol.dumps({"type": "request", "id": 4, "kind": "format_disk"}), protocol.dumps({"type": 7}),
           None]  # a line longer than the limit
    for line in bad:
        server.take(line)
    for body in ({"__dataclass__": "Segment", "fields": {"volume": 1, "prompts": "x"}}, {"no": "dataclass"},
                 {"__dataclass__": "Status", "fields": {}}, {"__dataclass__": "Segment"}, 12,
                 {"__dataclass__": "Batch", "fields": {"cases": [["a", 1, None]], "output_folder": "/tmp"}},
                 {"__dataclass__": "LoadModel", "fields": {"model": {"x": 1}, "device": "tpu"}},
                 {"__array__": [], "dtype": "float64", "shape": [10 ** 12]}):
        server.take(request_line(11, "segment" if "Batch" not in str(body) else "batch", body))
    server.serve_queued()
    server.take(request_line(99, "status", None))
    replies = server.replies.messages()
    assert replies[0]["type"] == "ready" and replies[-1]["type"] == "result" and replies[-1]["id"] == 99
    errors = replies[1:-1]
    assert len(errors) == len(bad) + 8 and all(r["type"] == "error" for r in errors), errors
    assert all(r["error"] == "InputError" and r["message"] for r in errors), errors
    assert errors[5]["message"].startswith("A request message needs an id")
    assert "longer than" in errors[len(bad) - 1]["message"]
    assert "Segment" in errors[len(bad)]["message"] or "volume" in errors[len(bad)]["message"]


def test_the_engine_reads_and_removes_only_its_own_files(server, tmp_path):
    """A request could name any file: it was read, and a named array was deleted after reading."""
    from SPDSegmentLib.engine import protocol

    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "a1-1.npy", np.ones(3))
    np.save(outside / "volume-ab.npy", np.zeros((2, 2, 2), np.int16))
    np.save(server.share / "user-data.npy", np.ones(3))
    os.symlink(outside / "a1-1.npy", server.share / "a2-1.npy")  # a link out of the private folder
    before = digests(tmp_path)

    def array_ref(path):
        return {"__array_box__": [0, 3], "dtype": "float64", "shape": [3], "file": {"path": str(path)}}

    volume_ref = {"__volume__": {"id": "v", "array": {"path": str(outside / "volume-ab.npy"), "dtype": "int16",
                                                      "shape": [2, 2, 2]}, "ijk_to_lps": np.eye(4).tolist()}}
    bodies = [{"__dataclass__": "Segment", "fields": {"volume": volume_ref, "prompts": None}},
              {"__dataclass__": "Segment", "fields": {"volume": None, "prompts": array_ref(outside / "a1-1.npy")}},
              {"__dataclass__": "Segment", "fields": {"volume": None, "prompts": array_ref(server.share / "user-data.npy")}},
              {"__dataclass__": "Segment", "fields": {"volume": None, "prompts": array_ref(server.share / "a2-1.npy")}},
              {"__dataclass__": "Segment", "fields": {"volume": None, "prompts": array_ref("../outside/a1-1.npy")}}]
    for index, body in enumerate(bodies):
        server.take(request_line(index, "segment", body))
    server.serve_queued()
    errors = server.replies.messages()[1:]
    assert [r["type"] for r in errors] == ["error"] * len(bodies)
    assert all("reads only its own files in its private folder" in r["message"] for r in errors), errors
    assert digests(tmp_path) == before  # nothing outside read-and-removed, nothing inside either
    np.save(server.share / "a7-1.npy", np.arange(3.0))  # the protocol's own temporary array: read, then removed
    assert protocol.from_json(array_ref(server.share / "a7-1.npy"), confine=server.share).tolist() == [0, 1, 2]
    assert not (server.share / "a7-1.npy").exists()


def test_seeded_fuzz_of_engine_messages(server, tmp_path):
    """500 messages made from valid ones by dropping, retyping and replacing parts (seed 0): every request gets
    exactly one reply, no exception leaves the reader, no file outside the private folder changes."""
    import json
    import random


    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "a1-1.npy").write_bytes(b"precious")
    before = digests(outside)
    rng = random.Random(0)
    junk = [None, True, -1, 2 ** 70, 1e308, float("nan"), "", "x" * 1000, [], {}, [[[]]], "../../precious/a1-1.npy",
            str(outside / "a1-1.npy"), {"__dataclass__": "Popen", "fields": {}}, {"__tuple__": 5},
            {"__array__": [1, 2], "dtype": "object", "shape": [2]}, {"__array__": [[1], [2, 3]], "dtype": "int8",
                                                                     "shape": [2]},
            {"__array__": [10 ** 30], "dtype": "int64", "shape": [1]},
            {"__array_box__": [0, 1], "dtype": "uint8", "shape": [1], "file": {"path": str(outside / "a1-1.npy")}},
            {"__volume__": {"id": "v", "array": {"path": str(outside / "a1-1.npy"), "dtype": "uint8", "shape": [8]}}}]
    templates = [
        {"type": "request", "id": 1, "kind": "segment",
         "body": {"__dataclass__": "Segment", "fields": {"volume": None, "prompts": None, "model": "no-such-model",
                                                         "options": {"__dataclass__": "SegmentOptions",
                                                                     "fields": {"neighbours": 2}}, "device": "cpu"}}},
        {"type": "request", "id": 2, "kind": "batch",
         "body": {"__dataclass__": "Batch", "fields": {"cases": [["a", "b", "c"]], "output_folder": str(tmp_path)}}},
        {"type": "request", "id": 3, "kind": "load_model",
         "body": {"__dataclass__": "LoadModel", "fields": {"model": "no-such-model", "device": "cpu"}}},
        {"type": "cancel", "id": 4}, {"type": "request", "id": 5, "kind": "status", "body": None}]

    def mutate(value, depth=0):
        if isinstance(value, dict) and value and depth < 6:
            value = dict(value)
            key = rng.choice(sorted(value))
            choice = rng.random()
            if choice < 0.3:
                del value[key]
            elif choice < 0.7:
                value[key] = rng.choice(junk)
            else:
                value[key] = mutate(value[key], depth + 1)
            return value
        return rng.choice(junk) if rng.random() < 0.5 else value

    def no_models(*args, **kwargs):  # the fuzz is about messages: no model loads (each would take seconds)
        raise SPDError("no models in the fuzz test")

    server.engine.model = no_models
    with within(120):
        for _ in range(500):
            message = mutate(rng.choice(templates))
            try:
                line = json.dumps(message).encode()
            except (TypeError, ValueError):
                continue
            server.take(line if rng.random() < 0.8 else line[: rng.randrange(1, len(line) + 1)])  # or cut short
            server.serve_queued()
    server.take(request_line("last", "status", None))
    replies = server.replies.messages()
    assert replies[-1]["type"] == "result" and replies[-1]["id"] == "last"
    assert all(r["type"] in ("ready", "result", "error", "cancelled", "progress") for r in replies), \
        {r["type"] for r in replies}
    assert all(r.get("error") != "EngineError" for r in replies if r["type"] == "error"), \
        [r for r in replies if r.get("error") == "EngineError"][:3]
    assert digests(outside) == before


def test_a_reply_the_engine_cannot_write_is_an_error_reply(server, monkeypatch):
    """The engine's replies are verified writes too: a full private folder is an error reply, not a result
    pointing at a cut file."""

    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    monkeypatch.setattr(server.engine, "handle", lambda request, progress: np.ones((64, 64, 64), np.uint8))
    server.take(request_line(5, "load_model", {"__dataclass__": "LoadModel", "fields": {"model": "x"}}))
    server.serve_queued()
    reply = server.replies.messages()[-1]
    assert reply["type"] == "error" and reply["id"] == 5 and "the disk is full" in reply["message"], reply
    assert sorted(p.name for p in server.share.iterdir()) == []


def test_a_line_too_long_is_dropped_as_it_arrives():
    from SPDSegmentLib.engine import protocol

    buffer = protocol.LineBuffer(max_line=100)
    assert buffer.lines(b"x" * 150) == [] and buffer._pending == b""
    assert buffer.lines(b"y" * 50 + b"\n" + b'{"type": "ok"}\n') == [None, b'{"type": "ok"}']
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        protocol.LineBuffer(max_line=100).feed(b"z" * 101 + b"\n")


def test_the_engine_process_survives_bad_messages_and_ends_with_its_pipe(tmp_path):
    """The child process itself: malformed requests, then a status request that is answered, then its stdin
    closes and it exits."""
    from SPDSegmentLib.engine import protocol

    share = tmp_path / "share"
    share.mkdir(mode=0o700)
    env = dict(child_env(tmp_path), **{protocol.TOKEN_ENV: "secret", protocol.SHARE_ENV: str(share)})
    lines = [protocol.dumps({"type": "hello", "token": "secret"}),
             protocol.dumps({"type": "request", "kind": "segment", "body": {}}), b"{not json\n", b"[]\n",
             request_line(1, "segment", {"__dataclass__": "Segment", "fields": {}}),
             request_line(2, "status", None)]
    done = subprocess.run([sys.executable, "-m", "SPDSegmentLib.engine"], input=b"".join(lines), env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    replies = Replies()
    replies.write(done.stdout)
    kinds = [(m["type"], m.get("id")) for m in replies.messages()]
    assert kinds[0][0] == "ready" and ("result", 2) in kinds
    assert [k for k in kinds if k[0] == "error"] == [("error", None)] * 3 + [("error", 1)], kinds
    assert b"Traceback" not in done.stderr


# ---------------------------------------------------------------- the cache

@pytest.mark.parametrize("kind", ["a file", "not creatable"])
def test_an_unusable_cache_folder_falls_back_to_a_private_temporary_one(monkeypatch, tmp_path, kind):
    """A cache folder that is read-only or is a file ended in a traceback."""
    from SPDSegmentLib.core import cache
    from SPDSegmentLib.core.errors import SPDWarning
    from SPDSegmentLib.research import train as T

    if kind == "a file":
        root = tmp_path / "cache"
        root.write_text("a file where the cache folder should be")
    else:
        root = Path("/proc/spd-no-such-cache")  # no one may create a folder here, not even root
        if not Path("/proc/self").is_dir():
            pytest.skip("needs /proc")
    monkeypatch.setenv("SPDSEGMENT_CACHE", str(root))
    monkeypatch.setattr(cache, "_folders", {})
    with pytest.warns(SPDWarning, match=f"The cache folder {root}/openvino cannot be used .* uses the temporary"):
        folder = cache.cache_folder("openvino")
    assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700" and str(root) not in str(folder)
    assert cache.cache_folder("openvino") == folder  # one warning per process and folder
    with pytest.warns(SPDWarning, match="features cannot be used"):
        store = T.default_store_root()
    assert store.is_dir() and store != folder
    if kind == "a file":
        assert root.read_text() == "a file where the cache folder should be"


def test_a_failed_openvino_conversion_falls_back_to_pytorch(capsys, monkeypatch, sample_paths, tmp_path):
    from SPDSegmentLib.core.models import openvino_runtime

    def cannot_save(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(openvino_runtime, "available", lambda: True)
    monkeypatch.setattr(openvino_runtime, "OpenVINORuntime", cannot_save)
    code, out, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "x.seg.nrrd",
                                               "--mode", "raw", "--runtime", "auto"))
    assert code == 0 and "warning: The model could not be converted for OpenVINO" in err and "PyTorch" in err, err
    assert "Traceback" not in err and (tmp_path / "x.seg.nrrd").exists()
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], tmp_path / "y.seg.nrrd",
                                             "--mode", "raw", "--runtime", "openvino"))
    assert_refused(code, err, "could not save its converted model", "(option --runtime)")


@pytest.mark.parametrize("damage", ["cut", "mismatch", "json"])
def test_a_damaged_feature_store_entry_is_encoded_again(damage, tiny_backbone, tmp_path):
    """A truncated feature-store file ended in a traceback."""
    from test_train import ellipsoid_case

    from SPDSegmentLib.core.errors import SPDWarning
    from SPDSegmentLib.research.features import FeatureStore, encode_case

    image, label = ellipsoid_case()
    volume = vol.Volume(image, np.eye(4))
    store = FeatureStore(tmp_path)
    first = encode_case(store, "d", "c", volume, label, 1, tiny_backbone)
    assert first.fresh and store.has("d", "c", 1)
    slices, q = first.slices, np.array(first.q)  # in memory: the file is about to be cut under its mapping
    del first
    entry = tmp_path / "d" / "c"
    if damage == "cut":
        data = (entry / "axis1.q.npy").read_bytes()
        (entry / "axis1.q.npy").write_bytes(data[: len(data) // 2])
    elif damage == "mismatch":
        np.save(entry / "axis1.scale.npy", np.ones((2, 3), np.float16))
    else:
        (entry / "axis1.json").write_text("{\"slices\": ")
    with pytest.warns(SPDWarning, match="damaged .* encoded again"):
        assert not store.has("d", "c", 1)
    with pytest.warns(SPDWarning):
        again = encode_case(store, "d", "c", volume, label, 1, tiny_backbone)
    assert again.fresh and again.slices == slices
    np.testing.assert_array_equal(again.q, q)
    assert store.has("d", "c", 1)
