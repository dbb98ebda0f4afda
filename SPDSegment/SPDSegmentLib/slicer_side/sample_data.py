"""The sample case in Slicer's Sample Data module (the Extensions Index asks this of a tutorial's data).

The case ships inside the package (``core/sample``: MSD hippocampus_001 and its sloppy clicks), so
nothing is downloaded: the Sample Data module copies the files from their local ``file://`` addresses
into Slicer's cache, checking each against its SHA-256 here (a changed file in a later version of the
extension is copied again), and loads them as the nodes the README's tutorial uses. Registered when
Slicer has started (``SPDSegment.py`` connects :func:`register` to ``startupCompleted``), as Slicer's
extension template and MONAIAuto3DSeg register theirs. The thumbnail comes from the extension's
top-level ``Resources/SampleData`` (installed beside the module's own resources by CMake).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..core.sample import SAMPLE_DIR

CATEGORY = "SPDSegment"
SAMPLE_NAME = "SPDSegmentHippocampus"  # unique among all Sample Data sources
THUMBNAIL = "SPDSegmentSample.png"
# (file, node name, SHA-256): the image and the clicks of the tutorial (Testing/test_sample_data.py checks them)
FILES = (
    ("hippocampus_001_image.nii.gz", "hippocampus_001_image",
     "ab47d6115b412ffaba041cbf48962967127f199f39eb56c777a6bb3746353b4a"),
    ("hippocampus_001_centerline.mrk.json", "hippocampus_001_centerline",
     "bf7044d4d04574075567d1c3ac9af6b440f1ec4c15d25398c245dbcd47018926"),
)


def thumbnail_path() -> Optional[Path]:
    """The thumbnail: beside the module's resources once installed, in the top-level Resources in a checkout."""
    module_folder = Path(__file__).resolve().parents[2]  # the folder holding SPDSegment.py (and SPDSegmentLib)
    for folder in (module_folder / "Resources" / "SampleData", module_folder.parent / "Resources" / "SampleData"):
        if (folder / THUMBNAIL).is_file():
            return folder / THUMBNAIL
    return None


def source_arguments() -> dict:
    """The arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the sample case."""
    thumbnail = thumbnail_path()
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [(SAMPLE_DIR / name).as_uri() for name, _, _ in FILES],
        "fileNames": [name for name, _, _ in FILES],
        "nodeNames": [node for _, node, _ in FILES],
        "checksums": [f"SHA256:{digest}" for _, _, digest in FILES],
        "thumbnailFileName": str(thumbnail) if thumbnail else None,
    }


def register(sample_data=None) -> List[str]:
    """Register the sample case with the Sample Data module (``sample_data``: its module, default Slicer's
    ``SampleData``); returns the node names it loads. Nothing happens where Sample Data is not loaded."""
    if sample_data is None:
        try:
            import SampleData as sample_data  # Slicer's Sample Data module
        except ImportError:
            return []
    logic = sample_data.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer 5.12 and later
        logic.registerCustomSampleDataCategory(CATEGORY, "SPDSegment")
    arguments = source_arguments()
    logic.registerCustomSampleDataSource(**arguments)
    return arguments["nodeNames"]
