"""The sample case in Slicer's Sample Data module: registered with the arguments Slicer's
``SampleDataLogic.registerCustomSampleDataSource`` takes, local file addresses whose checksums match the
files, node names the README's tutorial uses, and a thumbnail from the top-level Resources; the files
load through the way Sample Data fetches them (``urllib.request.urlretrieve`` of the ``file://`` address)."""
from __future__ import annotations

import hashlib
import inspect
import urllib.request
from pathlib import Path

from SPDSegmentLib.slicer_side import sample_data

ROOT = Path(__file__).resolve().parents[1]
# SampleDataLogic.registerCustomSampleDataSource's parameters (Slicer 5.10 and 5.12, Modules/Scripted/SampleData)
SLICER_PARAMETERS = ("category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                     "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums",
                     "loadFileType")


class FakeSampleDataLogic:
    sources, categories = [], []

    @staticmethod
    def registerCustomSampleDataCategory(category, title):
        FakeSampleDataLogic.categories.append((category, title))

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None,
                                       customDownloader=None, thumbnailFileName=None, loadFileTypes=None,
                                       loadFiles=None, loadFileProperties={}, checksums=None, loadFileType=None):
        FakeSampleDataLogic.sources.append(dict(category=category, sampleName=sampleName, uris=uris,
                                                fileNames=fileNames, nodeNames=nodeNames, checksums=checksums,
                                                thumbnailFileName=thumbnailFileName))


class FakeSampleData:
    SampleDataLogic = FakeSampleDataLogic


def test_the_fake_takes_slicers_parameters():
    assert tuple(inspect.signature(FakeSampleDataLogic.registerCustomSampleDataSource).parameters) == SLICER_PARAMETERS


def test_registration(tmp_path):
    FakeSampleDataLogic.sources, FakeSampleDataLogic.categories = [], []
    nodes = sample_data.register(FakeSampleData)
    assert nodes == ["hippocampus_001_image", "hippocampus_001_centerline"]
    assert FakeSampleDataLogic.categories == [("SPDSegment", "SPDSegment")]
    [source] = FakeSampleDataLogic.sources
    assert source["sampleName"] == "SPDSegmentHippocampus" and source["category"] == "SPDSegment"
    assert Path(source["thumbnailFileName"]) == ROOT / "Resources" / "SampleData" / "SPDSegmentSample.png"
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        assert uri.startswith("file://")
        copy = tmp_path / name
        urllib.request.urlretrieve(uri, copy)  # what SampleDataLogic.downloadFile does
        algorithm, digest = checksum.split(":")
        assert algorithm == "SHA256" and hashlib.sha256(copy.read_bytes()).hexdigest() == digest, name


def test_the_tutorial_uses_these_node_names():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for _, node, _ in sample_data.FILES:
        assert f'"{node}"' in readme, node
    assert sample_data.SAMPLE_NAME in readme and "Sample Data" in readme


def test_the_module_registers_it_when_slicer_has_started():
    text = (ROOT / "SPDSegment" / "SPDSegment.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", onStartupCompleted)' in text
    assert "sample_data.register()" in text
