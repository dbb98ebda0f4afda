"""A stand-in for Slicer's ``PythonSlicer`` launcher, for the engine's lifecycle tests.

``PythonSlicer`` is commontk's AppLauncher (``ctkAppLauncher.cpp``): it sets up the environment, starts
the real interpreter (``python-real``) as a child process with standard input, output and error
forwarded (the child holds the very same pipes), waits for it, and exits with its exit code, or
EXIT_FAILURE (1) when it crashed. Killing the launcher leaves the interpreter running. This script does
the same with the interpreter running the tests; :func:`make_launcher` writes an executable that the
engine client is given as its ``python``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def python_script_executable(folder, script, name: str = "PythonSlicer") -> Path:
    """An executable ``folder/name`` that runs the Python file ``script`` with this interpreter (POSIX)."""
    path = Path(folder) / name
    path.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {str(script)!r}\n"
                    f"runpy.run_path({str(script)!r}, run_name='__main__')\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def make_launcher(folder) -> Path:
    """An executable ``PythonSlicer`` in ``folder`` that runs this stand-in."""
    return python_script_executable(folder, Path(__file__).resolve())


def main() -> int:
    child = subprocess.Popen([sys.executable, *sys.argv[1:]])  # stdin, stdout and stderr: the same pipes
    code = child.wait()
    return code if code >= 0 else 1  # a crash (a signal) is EXIT_FAILURE, as ctkAppLauncher reports it


if __name__ == "__main__":
    sys.exit(main())
