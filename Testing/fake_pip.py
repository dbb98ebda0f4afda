"""A fake ``PythonSlicer`` for the install tests: ``-m pip`` and ``-m light_the_torch`` record their
arguments (and the constraints file they were given) instead of installing, and update a JSON file that
stands for Slicer's site-packages ({name: version}).

Behaviour comes from the ``FAKE_PIP`` environment variable (JSON):
- ``"openvino"``: what resolving OpenVINO gives: ``"fits"`` (a report installing OpenVINO only),
  ``"conflict"`` (pip's ResolutionImpossible: no release fits the pinned numpy, as on Intel macOS with
  Slicer 5.12), ``"changes numpy"`` (a report that would replace numpy);
- ``"fail"``: a requirements file name whose install fails;
- ``"sleep"``: seconds to sleep before finishing (``"sleep_after_unpacking"``: after printing
  "Installing collected packages", the point past which a kill could leave a package half-written).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def make_fake_python(folder) -> Path:
    """An executable ``PythonSlicer`` in ``folder`` that runs this fake."""
    from launcher_stand_in import python_script_executable  # the tests' helper; the fake itself runs alone

    return python_script_executable(folder, Path(__file__).resolve())


def requirement_names(path: str):
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            yield line.replace(">", "=").replace("<", "=").split("=")[0].strip().lower()


def main() -> int:
    args = sys.argv[1:]
    module, command = args[1], args[2:]
    behaviour = json.loads(os.environ.get("FAKE_PIP", "{}"))
    site_path = Path(os.environ["FAKE_PIP_SITE"])
    site = json.loads(site_path.read_text())
    constraints = command[command.index("-c") + 1] if "-c" in command else None
    with open(os.environ["FAKE_PIP_RECORD"], "a", encoding="utf-8") as record:
        record.write(json.dumps({"module": module, "args": command, "pid": os.getpid(),
                                 "constraints": Path(constraints).read_text() if constraints else None}) + "\n")
    files = [command[i + 1] for i, a in enumerate(command) if a == "-r"]
    names = [n for f in files for n in requirement_names(f)] + [a for a in command[1:] if a.startswith(("torch",
                                                                                                          "light"))]
    print(f"Collecting {', '.join(names)}", flush=True)
    if "--dry-run" in command:
        verdict = behaviour.get("openvino", "fits")
        if verdict == "conflict":
            print("ERROR: Cannot install openvino because these package versions have conflicting dependencies.")
            print("ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-"
                  "resolution/#dealing-with-dependency-conflicts")
            return 1
        report = [{"metadata": {"name": "openvino", "version": "2025.4.0"}}]
        if verdict == "changes numpy":
            report.append({"metadata": {"name": "numpy", "version": "2.3.5"}})
        Path(command[command.index("--report") + 1]).write_text(json.dumps({"install": report}))
        print("Would install " + " ".join(f"{r['metadata']['name']}-{r['metadata']['version']}" for r in report))
        return 0
    if any(Path(f).name == behaviour.get("fail") for f in files):
        print("ERROR: No matching distribution found for something-required")
        return 1
    time.sleep(float(behaviour.get("sleep", 0)))
    print(f"Installing collected packages: {', '.join(names)}", flush=True)
    time.sleep(float(behaviour.get("sleep_after_unpacking", 0)))
    if module == "light_the_torch":
        site.update({"torch": "2.5.1+cpu", "torchvision": "0.20.1+cpu"})
    for name in names:
        site.setdefault(name.split(">")[0], "1.0")
    site_path.write_text(json.dumps(site))
    print(f"Successfully installed {' '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
