"""Metrics, report writing and the U-Net baseline (the benchmark itself is a command, not a test)."""
import numpy as np
import pytest

from SPDSegmentLib.research import evaluate


def test_dice_known_values():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros_like(a)
    a[:2] = 1
    b[1:3] = 1
    assert evaluate.dice_score(a, a) == 1.0
    assert evaluate.dice_score(a, b) == pytest.approx(0.5)
    assert evaluate.dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_surface_distances_in_millimetres():
    label = np.zeros((20, 20, 20), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    shifted = np.roll(label, 2, axis=2)  # 2 voxels along i
    hd1, asd1 = evaluate.surface_distances(shifted, label, (1.0, 1.0, 1.0))
    hd2, _ = evaluate.surface_distances(shifted, label, (1.0, 1.0, 3.0))  # spacing along i is 3 mm
    assert hd1 == pytest.approx(2.0, abs=0.01)
    assert 0 < asd1 <= 2.0
    assert hd2 == pytest.approx(6.0, abs=0.01)
    assert evaluate.surface_distances(label, label, (1, 1, 1)) == (0.0, 0.0)


def test_empty_prediction_counts_as_the_image_diagonal():
    label = np.zeros((10, 10, 10), np.uint8)
    label[4:6, 4:6, 4:6] = 1
    hd, asd = evaluate.surface_distances(np.zeros_like(label), label, (2.0, 1.0, 1.0))
    assert hd == asd == pytest.approx(np.linalg.norm([20.0, 10.0, 10.0]))


def test_summary_statistics_and_reports(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for case in range(6):
        for method, base in (("spd", 0.8), ("sam_box", 0.5), ("unet", 0.6)):
            rows.append(dict(dataset="toy", case=f"c{case}", axis=1, view="coronal", level="moderate", method=method,
                             dice=base + rng.normal(0, 0.02), hd95=10 * (1 - base), asd=1.0, seconds=0.1))
    summary = evaluate.summarise(rows)
    spd = next(s for s in summary if s["method"] == "spd")
    box = next(s for s in summary if s["method"] == "sam_box")
    assert spd["n"] == 6 and spd["wilcoxon_p_vs_spd"] is None
    assert spd["dice_mean"] == pytest.approx(np.mean([r["dice"] for r in rows if r["method"] == "spd"]))
    assert box["wilcoxon_p_vs_spd"] == pytest.approx(0.03125)  # all 6 pairs favour SPD: exact two-sided p
    evaluate.write_reports(rows, summary, tmp_path, {"command": "spd evaluate", "machine": "test", "date": "today"})
    for name in ("per_case.csv", "summary.csv", "results.md", "dice_vs_noise.png", "meta.json"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "SPD (as shipped)" in table and "0.031" in table


def test_unet_baseline_trains_and_predicts(tmp_path, sample_paths, torch_one_thread):
    from SPDSegmentLib.research import unet
    from SPDSegmentLib.research.data import Case

    case = Case("h001", sample_paths["image"], sample_paths["label"])
    out = unet.train_unet([case], axis=1, out=tmp_path / "unet.pt", epochs=1)
    volume, label = case.load()
    mask = unet.predict(unet.load(out), volume, axis=1)
    assert mask.shape == label.shape and mask.dtype == np.uint8


def test_unet_shrunk_predicts_full_size_and_old_files_load(tmp_path, sample_paths, torch_one_thread):
    import torch
    from SPDSegmentLib.research import unet
    from SPDSegmentLib.research.data import Case

    case = Case("h001", sample_paths["image"], sample_paths["label"])
    out = unet.train_unet([case], axis=1, out=tmp_path / "unet.pt", epochs=1, shrink=2)
    volume, label = case.load()
    net = unet.load(out)
    assert net.shrink == 2
    assert unet.predict(net, volume, axis=1).shape == label.shape
    torch.save(net.state_dict(), tmp_path / "old.pt")  # the first format: a bare state dict, full size
    assert unet.load(tmp_path / "old.pt").shrink == 1
