"""End to end on the sample case with the real default models (LiteMedSAM + bundled SPD model).

The floors sit below the values measured on this case (README, docs/benchmarks.md) so that a
regression in geometry, prompts, saliency or decoding fails loudly.
"""
import re

import pytest

from SPDSegmentLib import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]


def test_demo_prints_dice_and_spd_beats_raw_prompts(tmp_path, capsys):
    assert cli.main(["demo", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    # progress while it encodes: per slice, with the expected total time (stderr)
    assert re.search(r"encoded slice \d+/\d+: [0-9.]+ s so far, about [0-9.]+ s in all", err), err
    assert re.search(r"encoded \d+ slices in [0-9.]+ s", err), err
    dice = {name.strip(): float(value) for name, value in re.findall(r"^\s+(.+?)\s+Dice ([0-9.]+)", out, re.M)}
    assert set(dice) == {"SAM (LiteMedSAM), raw points", "SAM (LiteMedSAM), box around raw points", "SPD"}
    assert dice["SPD"] > 0.65
    assert dice["SPD"] > dice["SAM (LiteMedSAM), box around raw points"] + 0.2
    assert (tmp_path / "demo_overlay.png").stat().st_size > 10_000
    assert (tmp_path / "demo_spd.seg.nrrd").exists()
