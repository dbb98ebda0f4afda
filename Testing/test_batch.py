"""``spd batch`` and ``core.batch``: pairing and manifests, shards, one failed row per bad case, resuming
(skip what is complete, rerun what changed), a SIGKILL in the middle of a write, the engine's Batch request,
and the same batch on a local Ray cluster (byte-identical masks)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from SPDSegmentLib.core import batch, prompts
from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.pipeline import SegmentOptions
from SPDSegmentLib.core.volume import read, read_label

from cli_helpers import run as run_cli

ROOT = Path(__file__).resolve().parents[1]
RAW = SegmentOptions(mode="raw")  # the tiny test model is a plain backbone


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    """(image bytes, one click inside the structure in LPS) of the bundled sample case."""
    from SPDSegmentLib.core.sample import sample_case

    case = sample_case()
    volume = read(case.image)
    label = read_label(case.label, like=volume)
    inside = np.argwhere(label > 0)
    picks = [inside[len(inside) // 3], inside[len(inside) // 2], inside[2 * len(inside) // 3]]
    lps = np.array([(volume.ijk_to_lps @ [i, j, k, 1.0])[:3] for k, j, i in picks])
    return Path(case.image).read_bytes(), lps


def write_case(folder: Path, name: str, case_files, points_folder: Path = None, image_name: str = None) -> None:
    image_bytes, lps = case_files
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (image_name or f"{name}.nii.gz")).write_bytes(image_bytes)
    prompts.write_markups((points_folder or folder) / f"{name}.mrk.json", lps)


@pytest.fixture()
def worker(tiny_backbone):
    return batch.Worker(tiny_backbone, batch.Settings(options=RAW))


def rows_of(path) -> list:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- where cases come from

def test_pair_cases_one_rule_for_flat_msd_and_nnunet_folders(tmp_path, case_files):
    flat = tmp_path / "flat"
    write_case(flat, "a", case_files)
    write_case(flat, "b", case_files, image_name="b_image.nii.gz")
    (flat / "c.nii.gz").write_bytes(b"")  # an image without points is left out
    (flat / "a_label.nii.gz").write_bytes(b"")
    (flat / "old_spd.seg.nrrd").write_bytes(b"")
    assert [(n, i.name, p.name) for n, i, p in batch.pair_cases(flat)] == [
        ("a", "a.nii.gz", "a.mrk.json"), ("b", "b_image.nii.gz", "b.mrk.json")]
    with pytest.raises(InputError, match="does not exist"):
        batch.pair_cases(tmp_path / "nope")

    msd = tmp_path / "msd"
    (msd / "points").mkdir(parents=True)
    for name in ("hippo_001", "hippo_002"):
        write_case(msd / "imagesTr", name, case_files, points_folder=msd / "points")
    cases = batch.read_cases(msd, tmp_path / "out")
    assert [c.name for c in cases] == ["hippo_001", "hippo_002"]
    assert cases[0].output == str(tmp_path / "out" / "hippo_001_spd.seg.nrrd")
    assert Path(cases[0].points).parent == msd / "points"

    nnunet = tmp_path / "nnunet"
    write_case(nnunet, "la_7", case_files, image_name="la_7_0000.nii.gz")
    (nnunet / "la_7_0001.nii.gz").write_bytes(b"")  # a second channel is not a case
    assert [(n, i.name) for n, i, _ in batch.pair_cases(nnunet)] == [("la_7", "la_7_0000.nii.gz")]

    (tmp_path / "nopoints" / "imagesTr").mkdir(parents=True)
    with pytest.raises(InputError, match="no point folder"):
        batch.read_cases(tmp_path / "nopoints", tmp_path / "out")


def test_manifest_paths_options_and_mistakes(tmp_path):
    manifest = tmp_path / "cohort" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("case,image,points,output,tau,slice_range,use_box\n"
                        "a,img/a.nii.gz,pts/a.mrk.json,,0.4,3 9,no\n"
                        ",img/b.nii.gz,pts/b.csv,sub/b.nii.gz,,,\n", encoding="utf-8")
    a, b = batch.read_manifest(manifest, tmp_path / "out")
    assert (a.name, a.image, a.output) == ("a", str(manifest.parent / "img/a.nii.gz"),
                                           str(tmp_path / "out" / "a_spd.seg.nrrd"))
    assert a.options == {"tau": 0.4, "slice_range": (3, 9), "use_box": False}
    assert (b.name, b.output, b.options) == ("b", str(tmp_path / "out" / "sub" / "b.nii.gz"), {})

    bad = tmp_path / "bad.csv"
    for text, message in (("image,points,colour\nx,y,red\n", r"unknown columns \['colour'\]"),
                          ("image\nx\n", r"missing columns \['points'\]"),
                          ("image,points\n", "no cases"),
                          ("image,points,tau\nx,y,high\n", "tau 'high' is not a valid value"),
                          ("case,image,points\na,x,y\na,z,w\n", "case name 'a' appears twice")):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(InputError, match=message):
            batch.read_manifest(bad, tmp_path / "out")


def test_shards_split_every_case_once_and_do_not_depend_on_order():
    cases = [batch.Case(f"case_{i:03d}", "i", "p", "o") for i in range(200)]
    shards = [batch.shard(cases, i, 4) for i in range(4)]
    names = [c.name for part in shards for c in part]
    assert sorted(names) == sorted(c.name for c in cases)  # each case in exactly one shard
    assert all(30 <= len(part) <= 70 for part in shards)  # roughly even
    reordered = batch.shard(list(reversed(cases)) + [batch.Case("new", "i", "p", "o")], 1, 4)
    assert {c.name for c in reordered} - {"new"} == {c.name for c in shards[1]}
    assert batch.parse_shard("3/4") == (3, 4)
    for text in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(InputError, match="not I/N"):
            batch.parse_shard(text)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", ".hidden", "a..b", "spa ce", "é", ""])
def test_unsafe_case_names_are_refused(name):
    with pytest.raises(InputError, match="cannot name an output file"):
        batch.check_case_name(name)
    assert batch.check_case_name(batch.safe_case_name(name or "x"))


# ---------------------------------------------------------------- running, failing, resuming

def test_a_bad_case_is_one_failed_row_and_the_others_finish(tmp_path, case_files, worker):
    data = tmp_path / "data"
    for name in ("a", "b"):
        write_case(data, name, case_files)
    write_case(data, "truncated", case_files)
    (data / "truncated.nii.gz").write_bytes(case_files[0][: len(case_files[0]) // 2])  # truncated
    write_case(data, "corrupt_points", case_files)
    (data / "corrupt_points.mrk.json").write_text("{not json", encoding="utf-8")
    out = tmp_path / "out"
    cases = batch.read_cases(data, out)
    cases.append(batch.Case("../escape", str(data / "a.nii.gz"), str(data / "a.mrk.json"), str(out / "x.seg.nrrd")))
    cases.append(batch.Case("outside", str(data / "a.nii.gz"), str(data / "a.mrk.json"),
                            str(tmp_path / "elsewhere.seg.nrrd")))
    rows = {r["case"]: r for r in batch.run(worker, cases, out)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "a": "done", "b": "done", "truncated": "failed", "corrupt_points": "failed", "../escape": "failed",
        "outside": "failed"}
    assert "truncated.nii.gz" in rows["truncated"]["error"]
    assert "not valid JSON" in rows["corrupt_points"]["error"]
    assert "cannot name an output file" in rows["../escape"]["error"]
    assert "outside the output folder" in rows["outside"]["error"]
    assert not (tmp_path / "elsewhere.seg.nrrd").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "a_spd.provenance.json", "a_spd.seg.nrrd", "b_spd.provenance.json", "b_spd.seg.nrrd", "results.csv"]
    table = {r["case"]: r for r in rows_of(out / "results.csv")}
    assert list(rows_of(out / "results.csv")[0]) == list(batch.RESULT_COLUMNS)
    assert table["a"]["output_sha256"] == batch.input_digest(out / "a_spd.seg.nrrd")
    assert int(table["a"]["voxels"]) > 0 and table["a"]["axis"] in "012"
    assert float(table["a"]["seconds"]) >= float(table["a"]["segment_seconds"]) > 0
    record = json.loads((out / "a_spd.provenance.json").read_text())
    assert record["inputs"]["image"]["sha256"] == batch.input_digest(data / "a.nii.gz")
    assert record["model"]["backbone"].startswith("tiny_sam_test") and record["settings"]["options"]["mode"] == "raw"


def test_rerun_skips_complete_cases_and_redoes_changed_ones(tmp_path, case_files, tiny_backbone, worker):
    data, out = tmp_path / "data", tmp_path / "out"
    for name in ("a", "b", "c"):
        write_case(data, name, case_files)
    cases = batch.read_cases(data, out)
    assert [r["status"] for r in batch.run(worker, cases, out)] == ["done"] * 3
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    rows = batch.run(worker, cases, out)
    assert [r["status"] for r in rows] == ["skipped"] * 3
    assert rows[0]["output_sha256"] and int(rows[0]["voxels"]) > 0  # the earlier run's record
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "results.csv"} == \
        {k: v for k, v in stamps.items() if k != "results.csv"}

    _, lps = case_files
    prompts.write_markups(data / "a.mrk.json", lps[:2])  # a changed input
    (out / "b_spd.seg.nrrd").write_bytes(b"half")  # a damaged output
    (out / "c_spd.seg.nrrd").unlink()  # an output removed
    assert [r["status"] for r in batch.run(worker, cases, out)] == ["done"] * 3

    other = batch.Worker(tiny_backbone, batch.Settings(options=SegmentOptions(mode="raw", box_margin_mm=2.0)))
    assert [r["status"] for r in batch.run(other, cases, out)] == ["done"] * 3  # a changed setting
    assert [r["status"] for r in batch.run(other, cases, out)] == ["skipped"] * 3
    per_case = [dict(c.__dict__, options={"box_margin_mm": 3.0}) if c.name == "a" else c.__dict__ for c in cases]
    assert [r["status"] for r in batch.run(other, [batch.Case(**c) for c in per_case], out)] == \
        ["done", "skipped", "skipped"]  # a manifest's per-case setting counts too


def test_a_disk_without_room_fails_the_case_before_segmenting(tmp_path, case_files, worker, monkeypatch):
    from SPDSegmentLib.core import files, pipeline

    data, out = tmp_path / "data", tmp_path / "out"
    write_case(data, "a", case_files)
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)
    monkeypatch.setattr(pipeline, "segment", lambda *a, **k: pytest.fail("segmented without room for the output"))
    [row] = batch.run(worker, batch.read_cases(data, out), out)
    assert row["status"] == "failed" and "need about" in row["error"] and "has 1.0 KB free" in row["error"]
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


def test_a_full_disk_keeps_the_earlier_outputs_byte_identical(tmp_path, case_files, tiny_backbone, worker,
                                                             monkeypatch):
    """The issue's worst case for ``spd batch``: a disk that fills while a case is rewritten (a changed setting)
    leaves its earlier mask and record as they were, and the case is one failed row naming the disk."""
    import errno

    from SPDSegmentLib.core import volume

    data, out = tmp_path / "data", tmp_path / "out"
    write_case(data, "a", case_files)
    cases = batch.read_cases(data, out)
    assert [r["status"] for r in batch.run(worker, cases, out)] == ["done"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "results.csv"}
    real = volume.write_segmentation

    def fill_the_disk(path, *args, **kwargs):
        real(path, *args, **kwargs)  # the mask reaches its temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(volume, "write_segmentation", fill_the_disk)
    other = batch.Worker(tiny_backbone, batch.Settings(options=SegmentOptions(mode="raw", box_margin_mm=2.0)))
    [row] = batch.run(other, cases, out)
    assert row["status"] == "failed" and "Could not write" in row["error"] and "the disk is full" in row["error"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "results.csv"} == before


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {package!r})
    from SPDSegmentLib.core import batch, volume
    from SPDSegmentLib.core.models import load_backbone
    from SPDSegmentLib.core.pipeline import SegmentOptions

    real = volume.write_segmentation
    def write_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if "b_spd" in str(path):  # the second case: its mask half-way to its name, then SIGKILL
            os.kill(os.getpid(), signal.SIGKILL)
    volume.write_segmentation = write_then_die
    worker = batch.Worker(load_backbone("tiny_sam_test", device="cpu"), batch.Settings(SegmentOptions(mode="raw")))
    batch.run(worker, batch.read_cases({data!r}, {out!r}), {out!r})
""")


def test_sigkill_in_the_middle_of_a_case_leaves_nothing_half_written(tmp_path, case_files, worker):
    data, out = tmp_path / "data", tmp_path / "out"
    for name in ("a", "b", "c"):
        write_case(data, name, case_files)
    script = KILL_SCRIPT.format(package=str(ROOT / "SPDSegment"), data=str(data), out=str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1", SPDSEGMENT_RUNTIME="torch")
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (out / "b_spd.seg.nrrd").exists() and not (out / "b_spd.provenance.json").exists()
    assert [r["case"] for r in rows_of(out / "results.csv")] == ["a"]  # written at the first case, never torn
    assert any(p.name.startswith(".") for p in out.iterdir())  # the killed write's temporary file ...

    rows = batch.run(worker, batch.read_cases(data, out), out)
    assert [r["status"] for r in rows] == ["skipped", "done", "done"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # ... is gone after the rerun


def test_cli_batch_with_shards_and_a_failed_case(tmp_path, case_files, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    names = [f"case_{i}" for i in range(6)]
    for name in names:
        write_case(data, name, case_files)
    (data / "case_5.mrk.json").write_text("[]", encoding="utf-8")
    common = ("--model", "tiny_sam_test", "--device", "cpu", "--mode", "raw", "--runtime", "torch", "--quiet")
    seen = []
    for index in range(2):
        code, stdout, stderr = run_cli(capsys, "batch", data, "--out", out, "--shard", f"{index}/2", *common)
        table = rows_of(out / f"results-shard-{index}-of-2.csv")
        seen += [r["case"] for r in table]
        failed = [r for r in table if r["status"] == "failed"]
        assert code == (5 if failed else 0), stderr
        assert [r["case"] for r in failed] == (["case_5"] if "case_5" in [r["case"] for r in table] else [])
        assert "failed: case_5" in stderr if failed else "failed" not in stderr
        assert "done" in stdout and "results:" in stdout
    assert sorted(seen) == names
    code, stdout, _ = run_cli(capsys, "batch", data, "--out", out, *common)
    assert code == 5 and "5 skipped, 1 failed" in stdout  # the unsharded rerun finds the shards' work

    code, _, stderr = run_cli(capsys, "batch", data, "--out", out, "--shard", "2/2", *common)
    assert code == 2 and "not I/N" in stderr and "--shard" in stderr


def test_engine_batch_request(tmp_path, case_files, tiny_backbone):
    from SPDSegmentLib.engine import protocol
    from SPDSegmentLib.engine.server import Engine

    data = tmp_path / "data"
    write_case(data, "a", case_files)
    request = protocol.Batch(batch.pair_cases(data), str(tmp_path / "out"), model=tiny_backbone, options=RAW)
    from SPDSegmentLib.core.cache import EmbeddingCache

    engine = Engine(cache=EmbeddingCache())
    rows = engine.handle(request)
    assert rows[0]["status"] == "done" and (tmp_path / "out" / "results.csv").is_file()
    assert len(engine.cache) == 0  # the batch used a cache of its own: the effect's stays as it was

    wire = protocol.to_json(protocol.Batch(batch.read_cases(data, tmp_path / "out"), str(tmp_path / "out")))
    again = protocol.from_json(json.loads(json.dumps(wire)))
    assert isinstance(again.cases[0], batch.Case) and again.cases[0].name == "a"


def test_scene_nodes_become_batch_cases(tmp_path, sample_paths, worker):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core (MRML in Python) is not installed")
    from slicer_app import make_standalone_app
    from SPDSegmentLib.slicer_side import gui

    app = make_standalone_app()
    volume_node, markups_node = app.load_volume(sample_paths["image"]), app.load_markups(sample_paths["points"])
    volume_node.SetName("Patient 1 / T1")  # a node name is made safe, not refused
    (case,) = gui.batch_cases([(volume_node, markups_node)], tmp_path / "out")
    assert case.name == "Patient_1_T1" and Path(case.image).parent == tmp_path / "out" / "inputs"
    written, original = read(case.image), read(sample_paths["image"])
    np.testing.assert_array_equal(written.array, original.array)
    np.testing.assert_allclose(written.ijk_to_lps, original.ijk_to_lps, atol=1e-5)
    np.testing.assert_allclose(prompts.read(case.points).lps, prompts.read(sample_paths["points"]).lps, atol=1e-4)
    assert [r["status"] for r in batch.run(worker, [case], tmp_path / "out")] == ["done"]


# ---------------------------------------------------------------- Ray

def test_ray_workers_fit_the_cluster():
    from SPDSegmentLib.cluster.ray_batch import ClusterError, plan_workers

    assert plan_workers({"CPU": 16.0}, "auto", None, 4, None) == (4, 4, 0.0)
    assert plan_workers({"CPU": 16.0, "GPU": 2.0}, "auto", None, 2, None) == (2, 2, 1.0)  # one per GPU
    assert plan_workers({"CPU": 16.0, "GPU": 2.0}, "cpu", None, 2, None) == (8, 2, 0.0)
    assert plan_workers({"CPU": 2.0}, "auto", 5, 1, None) == (2, 1, 0.0)  # never more than fit
    with pytest.raises(ClusterError, match="not enough for one worker"):
        plan_workers({"CPU": 2.0}, "auto", None, 4, None)


@pytest.mark.slow
def test_ray_local_cluster_gives_byte_identical_masks(tmp_path, case_files, worker, monkeypatch):
    ray = pytest.importorskip("ray")
    from SPDSegmentLib.cluster import ray_batch

    data = tmp_path / "data"
    for name in ("a", "b", "c", "d"):
        write_case(data, name, case_files)
    write_case(data, "corrupt", case_files)
    (data / "corrupt.nii.gz").write_bytes(b"\x1f\x8b broken")
    single = batch.run(worker, batch.read_cases(data, tmp_path / "single"), tmp_path / "single")

    monkeypatch.setenv("SPDSEGMENT_RUNTIME", "torch")  # passed on to the workers, as the worker fixture runs
    monkeypatch.setenv("SPDSEGMENT_PRECISION", "fp32")
    cases = batch.read_cases(data, tmp_path / "ray")
    spec = ray_batch.WorkerSpec("tiny_sam_test", device="cpu", settings=batch.Settings(options=RAW))
    try:
        rows = ray_batch.run(cases, tmp_path / "ray", spec, address="local", workers=2)
        assert [r["status"] for r in rows] == ["done", "done", "done", "failed", "done"]  # a b c corrupt d
        assert len({r["worker"] for r in rows}) == 2  # both workers took cases
        assert [r["output_sha256"] for r in rows] == [r["output_sha256"] for r in single]
        for name in "abcd":
            assert (tmp_path / "ray" / f"{name}_spd.seg.nrrd").read_bytes() == \
                (tmp_path / "single" / f"{name}_spd.seg.nrrd").read_bytes()
        assert [r["case"] for r in rows_of(tmp_path / "ray" / "results.csv")] == ["a", "b", "c", "corrupt", "d"]
        again = ray_batch.run(cases, tmp_path / "ray", spec, address="local", workers=2)
        assert [r["status"] for r in again] == ["skipped", "skipped", "skipped", "failed", "skipped"]
    finally:
        if ray.is_initialized():
            ray.shutdown()
