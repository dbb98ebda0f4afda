"""The Extensions Index entry (``SPDSegment.json``) passes the checks the index runs on a pull request,
re-implemented here without a network (the index's ``scripts/check_description_files.py`` and its lint:
check-jsonschema against schema v1.0.2, prettier, pre-commit's whitespace hooks), and the extension's
top-level ``Resources/`` holds only what the extension uses."""
from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = ROOT / "SPDSegment.json"
SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
# schema v1.0.2 (Slicer/Slicer Schemas/ and the index's schemas/): property -> type; no other property allowed
PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
              "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
              "tier": int}
REQUIRED = ("$schema", "category", "scm_url")
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
SIZE_LIMIT_MB = 100


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(DESCRIPTION.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cmake() -> str:
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def test_schema(entry):
    assert entry["$schema"] == SCHEMA
    for key in REQUIRED:
        assert key in entry, key
    for key, value in entry.items():
        assert key in PROPERTIES, f"{key} is not in schema v1.0.2 (additionalProperties: false)"
        assert isinstance(value, PROPERTIES[key]) and not (PROPERTIES[key] is int and isinstance(value, bool)), key
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert 1 <= entry["tier"] <= 5 and entry.get("scm_type", "git") in ("git", "local")


def test_file_format_as_the_index_lints_it():
    raw = DESCRIPTION.read_bytes()
    assert b"\r" not in raw, "LF line endings only"
    text = raw.decode("utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n"), "one newline at the end (end-of-file-fixer)"
    assert "\t" not in text and not re.search(r" +\n", text), "no tabs, no trailing whitespace"
    # prettier with prettier-plugin-multiline-arrays (threshold 0): two spaces, every array item on its own line
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"


def test_name_category_and_repository(entry, cmake):
    name = DESCRIPTION.stem
    assert not name.lower().startswith("slicer"), "the extension name should not start with Slicer"
    project = re.search(r"project\s*\(\s*([^\s)\n\r]+)", cmake, re.IGNORECASE).group(1).strip("\"'")
    assert project == name, "the top-level project() must be named like the description file"
    assert entry["category"] == "Segmentation"  # one of the index's ACCEPTED_EXTENSION_CATEGORIES
    url = urllib.parse.urlsplit(entry["scm_url"])
    assert url.scheme in ("git", "https") and "://" in entry["scm_url"]
    repository = Path(url.path.strip("/")).stem
    assert repository.startswith(REPOSITORY_PREFIXES), "the repository name should start with Slicer"
    assert entry["scm_revision"] == "main"  # a branch, so updates need no new pull request
    assert entry["build_subdirectory"] == "."


def test_consistent_with_the_top_level_cmake(entry, cmake):
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', cmake).group(1).split()
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', cmake).group(1)
    assert homepage.startswith(entry["scm_url"])


def test_icon_and_screenshots_are_images_in_the_repository(cmake):
    """The index downloads them and wants an image type; here: raw URLs of this repository's PNG/JPEG files."""
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake, re.IGNORECASE)
    screenshots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake, re.IGNORECASE)
    assert len(icon) == 1 and len(screenshots) == 1
    for url in [icon[0]] + screenshots[0].split():
        assert url.startswith("https://raw.githubusercontent.com/SPDSegment/SlicerSPDSegment/main/")
        path = ROOT / url.split("/main/", 1)[1]
        assert path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif") and path.is_file(), url
        assert path.read_bytes()[:8] in (b"\x89PNG\r\n\x1a\n",) or path.read_bytes()[:3] == b"\xff\xd8\xff", url


def test_license_in_the_root_and_named_on_the_homepage():
    assert any((ROOT / name).is_file() for name in LICENSE_NAMES)
    assert "Apache-2.0" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_repository_size_under_the_limit():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    total = sum((ROOT / f).stat().st_size for f in files.decode().split("\0") if f and (ROOT / f).is_file())
    assert total < SIZE_LIMIT_MB * 2 ** 20, f"{total / 2 ** 20:.1f} MB"


def test_top_level_resources_hold_only_what_the_extension_uses(cmake):
    used = {Path(u.split("/main/", 1)[1]) for u in re.findall(r"https://raw\.githubusercontent\.com/\S+?/main/[^\s\"]+",
                                                               cmake)}
    module_cmake = (ROOT / "SPDSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    used |= {(ROOT / "SPDSegment" / p).resolve().relative_to(ROOT)
             for p in re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\.\./Resources/\S+)", module_cmake)}
    files = {p.relative_to(ROOT) for p in (ROOT / "Resources").rglob("*") if p.is_file()}
    assert files and files == {p for p in used if p.parts[0] == "Resources"}, (files, used)
