"""The CMake lists stay true: every shipped file is listed in its module's CMakeLists.txt, and every
listed file exists (a Slicer build copies only what is listed; a missing entry breaks the installed
extension, a stale one breaks the build)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("SPDSegment", "SegmentEditorSPD")
SHIPPED = (".py", ".json", ".png", ".ui", ".txt", ".safetensors")
OPTIONAL = {".safetensors"}  # trained weights: listed only if present (see the foreach in the CMake file)


def cmake_tokens(module: str) -> set:
    text = (ROOT / module / "CMakeLists.txt").read_text(encoding="utf-8")
    text = re.sub(r"#[^\n]*", "", text).replace("${MODULE_NAME}", module)
    return set(re.findall(r"[^\s()\"]+", text))


def shipped_files(module: str):
    folder = ROOT / module
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or "__pycache__" in relative.parts or "Testing" in relative.parts:
            continue
        if any(part.endswith(".egg-info") for part in relative.parts):  # pip's build metadata, not shipped
            continue
        if path.name == "CMakeLists.txt" or path.name.startswith("."):
            continue
        if path.name.lower().endswith(SHIPPED):
            yield relative.as_posix()


@pytest.mark.parametrize("module", MODULES)
def test_every_file_is_listed(module):
    tokens = cmake_tokens(module)
    missing = [f for f in shipped_files(module) if f not in tokens]
    assert not missing, f"add to {module}/CMakeLists.txt: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_every_listed_file_exists(module):
    listed = [t for t in cmake_tokens(module) if t.lower().endswith(SHIPPED) and not t.startswith("$")]
    stale = [t for t in listed if not (ROOT / module / t).is_file() and Path(t).suffix not in OPTIONAL]
    assert not stale, f"listed in {module}/CMakeLists.txt but missing: {stale}"


@pytest.mark.parametrize("module", MODULES)
def test_every_resource_the_code_loads_is_listed(module):
    """A Resources/ file the module opens by ``resourcePath`` (its .ui panel, icons) must be installed with it."""
    tokens = cmake_tokens(module)
    code = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / module).glob("*.py"))
    loaded = {"Resources/" + name for name in re.findall(r'resourcePath\(\s*"([^"]+)"', code)}
    assert not loaded - tokens, f"add to {module}/CMakeLists.txt: {sorted(loaded - tokens)}"
    if module == "SPDSegment":
        assert "Resources/UI/SPDSegment.ui" in loaded  # the panel is the Designer file


@pytest.mark.parametrize("module", MODULES)
def test_module_macro_and_tests(module):
    text = (ROOT / module / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert f"set(MODULE_NAME {module})" in text


# Slicer's extension template (Utilities/Templates/Extensions/Default/CMakeLists.txt, Slicer 5.12 and main)
TEMPLATE_CMAKE_MINIMUM = "cmake_minimum_required(VERSION 3.28.0...3.28.0 FATAL_ERROR)"
TEMPLATE_FIELDS = ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                   "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")


def test_top_level_cmake():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert text.startswith(TEMPLATE_CMAKE_MINIMUM)
    assert "project(SPDSegment)" in text
    for key in TEMPLATE_FIELDS:
        assert re.search(rf"set\({key} \S", text), key
    # the template has no category since Slicer moved it to the index's description file (SPDSegment.json)
    assert "EXTENSION_CATEGORY" not in text
    assert re.search(r'set\(EXTENSION_DEPENDS "?PyTorch"?\)', text)
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SPDSegment)",
             "add_subdirectory(SegmentEditorSPD)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)


def test_extension_urls_name_files_in_the_repository():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(rf'set\({key} "([^"]+)"\)', text).group(1).split()
        for url in urls:
            relative = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)$", url).group(1)
            assert (ROOT / relative).is_file(), f"{key} names {relative}, which is not in the repository"


def test_contributors_say_name_and_organisation_alike_everywhere():
    """Every contributor reads "Name (Organisation)", as Slicer's Extension Wizard parses them (a name, then the
    organisation in parentheses), and the extension and both modules name the same people."""
    pattern = re.compile(r"^[^(),]+ \([^()]+\)$")
    cmake = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1)
    lists = [[n.strip() for n in re.split(r"(?<=[)])\s*,", cmake)]]
    for module in ("SPDSegment/SPDSegment.py", "SegmentEditorSPD/SegmentEditorSPD.py"):
        found = re.search(r"contributors = \[([^\]]+)\]", (ROOT / module).read_text()).group(1)
        lists.append([n.strip().strip("\"'") for n in re.split(r"(?<=[)][\"'])\s*,", found)])
    assert all(pattern.match(n) for n in lists[0]), lists[0]
    assert all(names == lists[0] for names in lists), lists


def test_the_sample_data_thumbnail_is_installed_from_the_top_level_resources():
    text = (ROOT / "SPDSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    source = re.search(r"configure_file\(\s*\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\s+(\S+)\s+COPYONLY\)", text)
    assert source, "no configure_file for the thumbnail"
    assert (ROOT / "SPDSegment" / source.group(1)).resolve() == ROOT / "Resources" / "SampleData" / "SPDSegmentSample.png"
    assert source.group(2).endswith("${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/SampleData/SPDSegmentSample.png")


def test_minimum_slicer_version_is_one_fact():
    from SPDSegmentLib.slicer_side.adapter import MINIMUM_SLICER

    version = "{}.{}".format(*MINIMUM_SLICER)
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f'set(SPDSegment_MINIMUM_SLICER_VERSION "{version}")' in cmake
    assert "VERSION_LESS SPDSegment_MINIMUM_SLICER_VERSION" in cmake and "FATAL_ERROR" in cmake
    assert f"Slicer {version} or newer" in (ROOT / "README.md").read_text(encoding="utf-8")
