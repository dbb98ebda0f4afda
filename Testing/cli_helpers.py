"""Helpers shared by the command-line tests: run ``spd`` in-process, build segment arguments, list files."""
from __future__ import annotations

from pathlib import Path

from SPDSegmentLib import cli


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``spd ARGV``."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def segment_args(image, points, out, *extra, model="tiny_sam_test"):
    return ("segment", image, "--points", points, "--model", model, "--device", "cpu", "--out", out, "--quiet",
            *extra)


def files_in(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.is_file())
