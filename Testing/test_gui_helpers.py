"""What the module and the effect share (SPDSegmentLib.slicer_side.gui), without Qt, Slicer or torch."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from SPDSegmentLib.core import prompts
from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.models import registry
from SPDSegmentLib.core.volume import read, read_label
from SPDSegmentLib.slicer_side import gui


def test_parse_progress_and_train_arguments():
    assert gui.parse_progress("stage 1 (saliency):  40%|####      | 40/100 [00:10<00:15,  4.00it/s]") == 0.4
    assert gui.parse_progress("loading cases") is None
    args = gui.train_arguments("/data/Task04", "/out/m.spd.safetensors", epochs=3, lora=True, device="cpu")
    assert args[:3] == ["-m", "SPDSegmentLib.cli", "train"]
    assert args[args.index("--stage1-epochs") + 1] == "3" and args[args.index("--mode") + 1] == "lora"
    with pytest.raises(InputError):
        gui.train_arguments("", "/out/m.spd.safetensors")


def test_train_arguments_parse_with_the_cli():
    cli = pytest.importorskip("SPDSegmentLib.cli")
    parsed = cli.build_parser().parse_args(gui.train_arguments("/d", "/o.spd.safetensors", 2)[2:])
    assert parsed.data == "/d" and parsed.out == "/o.spd.safetensors" and parsed.stage1_epochs == 2


def test_model_menu_lists_every_bundled_spd_model_then_the_catalogue(monkeypatch, tmp_path):
    names = [name for name, _ in gui.model_choices()]
    assert names[0] == registry.DEFAULT_MODEL
    assert set(registry.BUNDLED_SPD_MODELS) <= set(names) and list(registry.catalogue()) == names[-len(
        registry.catalogue()):]
    monkeypatch.setitem(registry.BUNDLED_SPD_MODELS, "spd-another", tmp_path / "another.spd.safetensors")
    assert "spd-another" in [name for name, _ in gui.model_choices()]  # whatever the registry bundles
    assert "licence" in gui.model_status("sam_vit_b")
    assert "bundled" in gui.model_status(names[0])


def test_tau_and_neighbours_start_at_the_models_own_values(tmp_path):
    import json
    import os
    import struct

    def write(tau):
        header = {"spd_header": json.dumps({"format": "spdsegment-model", "tau": tau, "neighbours": 3})}
        data = json.dumps({"__metadata__": header}).encode()
        path.write_bytes(struct.pack("<Q", len(data)) + data)

    path = tmp_path / "mine.spd.safetensors"
    write(0.35)
    assert gui.model_defaults(str(path)) == (0.35, 3)
    bundled = gui.spd_header(registry.BUNDLED_SPD_MODELS[registry.DEFAULT_MODEL])
    assert gui.model_defaults(registry.DEFAULT_MODEL) == (bundled["tau"], bundled["neighbours"])
    write(0.4)  # retrained under the same name: read again, not a stale copy
    os.utime(path, ns=(1, 2_000_000_000))
    assert gui.model_defaults(str(path)) == (0.4, 3)
    assert gui.model_defaults("litemedsam") is None  # a backbone: raw mode, no tau
    assert gui.model_defaults(str(tmp_path / "missing.spd.safetensors")) is None
    assert gui.TAU_RANGE[0] < 0.05 and gui.TAU_RANGE[1] > 0.95  # every model's own tau fits the sliders


def test_click_kinds_and_the_status_line():
    assert [gui.click_kind(False, False), gui.click_kind(False, True), gui.click_kind(True, False),
            gui.click_kind(True, True)] == ["click", "correction", "background", "background"]
    assert [gui.click_description(k) for k in ("click", "correction", "background")] == ["", "correction",
                                                                                         "background"]
    assert [gui.kind_of_description(d) for d in ("", " Background ", "CORRECTION", "note")] == \
        ["click", "background", "correction", "click"]
    assert gui.clicks_line(["click"] * 3 + ["background"] + ["correction"] * 2, "axial slices (array axis 0), the "
                           "slice view the clicks were placed in") == \
        "6 clicks (1 background, 2 corrections); axial slices (array axis 0), the slice view the clicks were placed in."
    assert gui.clicks_line(["click"], "") == "1 click."


def test_slice_numbers_are_the_data_probes():
    assert [gui.slice_letter(a) for a in (0, 1, 2)] == ["K", "J", "I"]  # arrays are (k, j, i)
    assert gui.slice_span([7, 3, 5], 40) == (3, 7) and gui.slice_span([], 40) == (0, 39)


def test_progress_line():
    handle = types.SimpleNamespace(state=lambda: ("encode", 3, 12))
    assert gui.progress_line(handle, "Updating the preview") == "Updating the preview: encode 3/12..."
    assert gui.progress_line(types.SimpleNamespace(state=lambda: ("", 0, 0))) == "Segmenting..."


def test_status_line_shows_counts_axis_and_warnings():
    from SPDSegmentLib.core.distill import AuditEntry

    from SPDSegmentLib.core.pipeline import Result

    result = Result(mask=np.ones((2, 4, 5), np.uint8), axis=0, slices=[0, 1], mode="spd",
                    audit=[AuditEntry(np.zeros(2), 1, "kept", 1, 0.9)])
    result.axis_note, result.warnings = "coronal (from the view)", ["all clicks rejected"]
    text = gui.summary(result)
    assert text.startswith(result.summary() + ".") and "40 voxels" in text
    assert "coronal (from the view)." in text and "Warning: all clicks rejected" in text
    assert gui.error_line(InputError("bad points\nmore")) == "bad points"
    assert gui.error_line(KeyError("x")) == "KeyError: 'x'"


def write_case(folder, name, sample_paths, points_name):
    import shutil

    shutil.copy(sample_paths["image"], folder / f"{name}.nii.gz")
    volume = read(sample_paths["image"])
    label = read_label(sample_paths["label"], like=volume)
    k, j, i = np.argwhere(label > 0)[len(np.argwhere(label > 0)) // 2]
    lps = (volume.ijk_to_lps @ [i, j, k, 1.0])[:3]
    prompts.write_markups(folder / points_name, lps[None])


def test_batch_cases(tmp_path, sample_paths):
    write_case(tmp_path, "a", sample_paths, "a_centerline.mrk.json")
    write_case(tmp_path, "b", sample_paths, "b.mrk.json")
    (tmp_path / "c.nii.gz").write_bytes(b"")  # an image without points is left out
    (tmp_path / "a_label.nii.gz").write_bytes(b"")
    cases = gui.batch_cases(tmp_path, tmp_path / "out")  # core.batch's pairing rule
    assert [(c.name, Path(c.image).name, Path(c.points).name) for c in cases] == [
        ("a", "a.nii.gz", "a_centerline.mrk.json"), ("b", "b.nii.gz", "b.mrk.json")]
    with pytest.raises(InputError, match="does not exist"):
        gui.batch_cases(tmp_path / "nope", tmp_path / "out")
    assert gui.batch_summary([{"case": "a", "status": "done", "error": ""},
                              {"case": "b", "status": "failed", "error": "bad"}]) == "Batch: a done; b failed: bad"
    many = [{"case": f"c{i}", "status": "done", "error": ""} for i in range(11)] + \
        [{"case": "x", "status": "failed", "error": "bad"}]
    assert gui.batch_summary(many).startswith("Batch: 11 done, 0 skipped (done before), 1 failed (x: bad)")


def test_slicer_version_is_checked_before_a_run():
    from SPDSegmentLib.slicer_side import adapter

    adapter.check_slicer_version((5, 10))
    adapter.check_slicer_version((6, 0))
    with pytest.raises(InputError, match=r"needs Slicer 5\.10 or later; this is Slicer 5\.8"):
        adapter.check_slicer_version((5, 8))
