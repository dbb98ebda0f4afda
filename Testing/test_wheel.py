"""The package stands on its own: its wheel, installed into a fresh virtual environment and run from
another folder, finds its catalogue, bundled model and sample case (``spd demo`` passes).

The fresh environment gets the wheel only; its dependencies (torch, SimpleITK, ...) are borrowed from
the environment running the tests through a ``.pth`` line, so nothing is downloaded.
"""
from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """(bin folder, site-packages) of a fresh venv holding only the freshly built SPDSegment wheel."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # build from a copy: the checkout gets no build/ or egg-info from this test
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "Testing", "docs", "spd_demo", "benchmark"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", work / "dist", source])
    [wheel] = (work / "dist").glob("spdsegment-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies of the environment running the tests, after the venv's own site-packages
    borrowed = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "zz_borrowed_dependencies.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")
    return python.parent, purelib


def test_the_wheel_carries_its_data(installed_wheel):
    _, purelib = installed_wheel
    package = purelib / "SPDSegmentLib"
    for relative in ("core/models/catalogue.json", "core/models/spd_hippocampus.spd.safetensors",
                     "core/models/spd_left_atrium.spd.safetensors",
                     "core/sample/hippocampus_001_image.nii.gz", "core/sample/hippocampus_001_label.nii.gz",
                     "core/sample/hippocampus_001_centerline.mrk.json", "core/sample/README.md",
                     "research/splits.json"):
        assert (package / relative).is_file(), relative


@pytest.mark.usefixtures("user_cache")
def test_spd_demo_from_the_installed_wheel_in_another_folder(installed_wheel, tmp_path):
    bin_dir, purelib = installed_wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    where = run([bin_dir / "python", "-c", "import SPDSegmentLib; print(SPDSegmentLib.__file__)"],
                cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(purelib), where  # the wheel's copy, not the checkout's
    done = run([bin_dir / "spd", "demo", "--device", "cpu"], cwd=tmp_path, env=env, timeout=900)
    dice = {name.strip(): float(value) for name, value in re.findall(r"^\s+(.+?)\s+Dice ([0-9.]+)", done.stdout, re.M)}
    assert dice["SPD"] > 0.65, done.stdout
    assert (tmp_path / "spd_demo" / "demo_spd.seg.nrrd").is_file()
