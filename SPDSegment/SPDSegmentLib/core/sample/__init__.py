"""The bundled sample case, shipped inside the package so that a wheel installed anywhere finds it.

MSD Task04 Hippocampus case 001 (CC BY-SA 4.0, see README.md in this folder) and a sloppy
centerline of clicks on it (`spd simulate`, level moderate, seed 0, array axis 1).
Used by ``spd demo``, ``spd bench-speed``, the int8 calibration and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

SAMPLE_DIR = Path(__file__).resolve().parent
CASE = "hippocampus_001"


@dataclass(frozen=True)
class SampleCase:
    name: str
    image: Path  # NIfTI image
    label: Path  # NIfTI label (1 anterior, 2 posterior hippocampus)
    clicks: Path  # Slicer point list (.mrk.json, LPS)
    axis: int  # the array axis the clicks were placed along


def sample_case() -> SampleCase:
    """The sample case's files; raises InputError when an installation lacks them."""
    case = SampleCase(name=CASE, image=SAMPLE_DIR / f"{CASE}_image.nii.gz", label=SAMPLE_DIR / f"{CASE}_label.nii.gz",
                      clicks=SAMPLE_DIR / f"{CASE}_centerline.mrk.json", axis=1)
    missing = [p.name for p in (case.image, case.label, case.clicks) if not p.is_file()]
    if missing:
        raise InputError(f"The sample case is missing from this installation ({', '.join(missing)} not in "
                         f"{SAMPLE_DIR}); reinstall SPDSegment.")
    return case
