"""Metrics, the demo overlay, and ``spd evaluate`` (the benchmark; a command, never a test).

Per case: 3D Dice, HD95 and ASD in millimetres (MONAI's surface-distance metrics with the image
spacing). An empty prediction has no surface: its HD95 and ASD are set to the diagonal of the
image (the largest possible distance) so that failures count against a method instead of
disappearing from the mean. Paired Wilcoxon signed-rank tests (scipy) compare SPD with each method.
"""
from __future__ import annotations

import csv
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy.stats import wilcoxon

from ..core import spd_model
from ..core.files import OutputSet
from ..core.models.registry import load_backbone, resolve_device
from ..core.pipeline import SegmentOptions, segment
from ..core.volume import get_slice
from . import unet
from .data import find_cases, load_split, structure_range
from .metrics import dice_score, score, surface_distances
from .simulate import simulate

# MONAI and matplotlib (the "train" extra) are imported where they are used: the demo's Dice needs neither.

METHODS = {
    "sam_points": "SAM zero-shot, raw points",
    "sam_box": "SAM zero-shot, box around raw points",
    "sam_tuning": "SAM-Tuning (decoder tuned on raw clicks)",
    "unet": "Supervised 2D U-Net (no prompts)",
    "saliency": "ladder: saliency head alone (thresholded)",
    "oracle_box": "ladder: decoder with the ground-truth box",
    "oracle_clean": "ladder: decoder with clean clicks + ground-truth box",
    "consensus": "ladder: decoder with SPD's consensus prompts",
    "spd": "SPD (as shipped)",
}
REFERENCE = "spd"  # what the Wilcoxon tests compare against: SPD as shipped
# Inference-time levers: SPD as shipped with one setting changed (measured at moderate noise in the main view).
LEVERS = {
    "spd_points": ("decoder given consensus points + box", dict(decoder_prompt="points+box")),
    "spd_box": ("decoder given the saliency box only", dict(decoder_prompt="box")),
    "spd_decoder": ("decoder alone (no fusion)", dict(fusion=0.0)),
    "spd_fuse": ("saliency and decoder averaged", dict(fusion=0.5)),
    "spd_saliency": ("saliency alone on SPD's slices", dict(fusion=1.0)),
    "spd_clicked": ("only the 3D parts holding a click", dict(components="clicked")),
    "spd_local": ("local validation only (no borrowing)", dict(local_only=True)),
    "spd_skip": ("slices CPD leaves empty stay empty", dict(empty_slice="skip")),
}


def overlay_png(path, volume, label, masks: Dict[str, np.ndarray], prompts, axis: int, n_slices: int = 4) -> Path:
    """A few slices: ground truth outline, each method's mask, and the clicks of that slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, last = structure_range(label, axis)
    picks = np.linspace(first + 2, last - 2, n_slices).round().astype(int)
    by_slice = prompts.by_slice()
    fig, axes = plt.subplots(len(masks), n_slices, figsize=(2.6 * n_slices, 2.6 * len(masks)), squeeze=False)
    for row, (title, mask) in enumerate(masks.items()):
        for col, t in enumerate(picks):
            ax = axes[row, col]
            ax.imshow(get_slice(volume.array, axis, t), cmap="gray")
            ax.contour(get_slice(label, axis, t), levels=[0.5], colors="lime", linewidths=1)
            ax.contour(get_slice(mask, axis, t), levels=[0.5], colors="orange", linewidths=1)
            if t in by_slice:
                rc = by_slice[t][0]
                ax.plot(rc[:, 1], rc[:, 0], "c+", markersize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(f"slice {t}", fontsize=8)
            if col == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle("green: ground truth, orange: result, cyan +: sloppy clicks", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the benchmark

def method_title(method: str) -> str:
    if method in METHODS:
        return METHODS[method]
    if method in LEVERS:
        return "lever: " + LEVERS[method][0]
    return "lever: model " + method  # a model file MODELS_DIR/{dataset}_{method}.spd.safetensors


def _models(models_dir: Path, dataset: str, device: str, runtime: str, precision: str, log) -> Dict[str, object]:
    """The benchmark's models of one dataset: the backbone, SPD, SAM-Tuning, and every lever model file."""
    found = {"backbone": load_backbone("litemedsam", device=device)}
    for path in sorted(models_dir.glob(f"{dataset}_*.spd.safetensors")):
        name = path.name[len(dataset) + 1:-len(spd_model.SUFFIX)]
        found["sam_tuning" if name == "samtune" else name] = spd_model.load(path, device)
    if "spd" not in found:
        log(f"{dataset}: no {dataset}_spd.spd.safetensors in {models_dir}: SPD is not evaluated")
    for model in found.values():
        getattr(model, "backbone", model).set_runtime(runtime, precision)
    return found


def _run(volume, label, prompts, model, options, cache, spacing_kji) -> dict:
    t0 = time.perf_counter()
    result = segment(volume, prompts, model, options, cache=cache)
    seconds = time.perf_counter() - t0
    hd95, asd = surface_distances(result.mask, label, spacing_kji)
    return {"dice": dice_score(result.mask, label), "hd95": hd95, "asd": asd, "seconds": seconds}


def evaluate_dataset(dataset: str, data_root: Path, models_dir: Path, store, levels: List[str], seed: int,
                     device: str, log, views: str = "all", ladder_rungs: bool = True, max_cases: int = 0,
                     runtime: str = "auto", precision: str = "auto") -> List[dict]:
    """Rows (dataset, case, axis, view, level, method, dice, hd95, asd, seconds) over the full test split.

    Main view (the split's axis), every level: SAM zero-shot (points; box), SAM-Tuning, SPD, the U-Net.
    Main view, moderate: the ladder (``research/ladder.py``) and SPD's levers (:data:`LEVERS` and every
    other model file of this dataset). Other views (``views="all"``), moderate: SPD and SAM with a box.
    Embeddings come from the feature store (``store``), put under inference's key, so every method runs
    the real ``pipeline.segment`` without encoding again.
    """
    from . import ladder
    from ..core.prompts import axis_name

    split = load_split(dataset)
    main_axis = int(split["axis"])
    models = _models(models_dir, dataset, device, runtime, precision, log)
    spd = models.get("spd")
    unet_file = models_dir / f"{dataset}_unet.pt"
    unet_net = unet.load(unet_file) if unet_file.exists() else None
    axes = [main_axis] + ([a for a in range(3) if a != main_axis] if views == "all" else [])
    names = split["test_full"][:max_cases] if max_cases else split["test_full"]
    rows = []
    for index, case in enumerate(find_cases(data_root / dataset, names)):
        volume, label = case.load()
        spacing_kji = volume.spacing[::-1]
        for axis in axes:
            if not store.has(dataset, case.name, axis):
                log(f"{dataset} {case.name}: no stored embeddings along axis {axis} (scripts/encode_features.py); "
                    "skipped")
                continue
            entry = store.entry(dataset, case.name, axis)
            cache = ladder.prefilled_cache(entry)
            main = axis == main_axis
            base = {"dataset": dataset, "case": case.name, "axis": axis, "view": axis_name(axis, volume)}
            for level in (levels if main else ["moderate"]):
                prompts = simulate(label, axis, level, seed=10_000 + 100 * seed + index).voxel_prompts(volume)
                runs = {"sam_box": (models["backbone"], SegmentOptions(mode="raw", use_box=True))}
                if main:
                    runs["sam_points"] = (models["backbone"], SegmentOptions(mode="raw", use_box=False))
                    if "sam_tuning" in models:
                        runs["sam_tuning"] = (models["sam_tuning"], SegmentOptions(mode="raw", use_box=True))
                if spd is not None:
                    runs["spd"] = (spd, SegmentOptions())
                    if main and level == "moderate":
                        runs.update({name: (spd, SegmentOptions(**changes)) for name, (_, changes) in LEVERS.items()})
                        runs.update({name: (model, SegmentOptions()) for name, model in models.items()
                                     if name not in ("backbone", "spd", "sam_tuning")})
                for method, (model, options) in runs.items():
                    rows.append({**base, "level": level, "method": method,
                                 **_run(volume, label, prompts, model, options, cache, spacing_kji)})
                if main and level == "moderate" and spd is not None and ladder_rungs:
                    masks = ladder.run_case(spd, volume, label, axis, level, 10_000 + 100 * seed + index, entry,
                                            rungs=("saliency", "oracle_box", "oracle_clean", "consensus"))
                    rows += [{**base, "level": level, "method": rung, **score(mask, label, spacing_kji),
                              "seconds": 0.0} for rung, mask in masks.items()]
                if main and unet_net is not None:
                    if level == levels[0]:
                        unet_scores = score(unet.predict(unet_net, volume, axis), label, spacing_kji)
                    rows.append({**base, "level": level, "method": "unet", **unet_scores, "seconds": 0.0})
            log(f"{dataset} {case.name} axis {axis}: " + ", ".join(
                f"{r['method']} {r['dice']:.3f}" for r in rows
                if r["case"] == case.name and r["axis"] == axis and r["level"] == "moderate"))
    return rows


def summarise(rows: List[dict], reference: str = REFERENCE) -> List[dict]:
    """Mean and sd per (dataset, axis, level, method), with the paired Wilcoxon p of Dice against ``reference``."""
    summary = []
    groups = sorted({(r["dataset"], int(r["axis"]), r["level"]) for r in rows},
                    key=lambda g: (g[0], g[1], LEVEL_ORDER.index(g[2]) if g[2] in LEVEL_ORDER else 9))
    for dataset, axis, level in groups:
        subset = [r for r in rows if r["dataset"] == dataset and int(r["axis"]) == axis and r["level"] == level]
        ref = {r["case"]: r for r in subset if r["method"] == reference}
        methods = list(dict.fromkeys(r["method"] for r in subset))
        for method in methods:
            mine = [r for r in subset if r["method"] == method]
            entry = {"dataset": dataset, "axis": axis, "view": mine[0].get("view", ""), "level": level,
                     "method": method, "n": len(mine)}
            for metric in ("dice", "hd95", "asd", "seconds"):
                values = np.array([float(r[metric]) for r in mine], float)
                entry[f"{metric}_mean"] = float(values.mean())
                entry[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            p = None
            if method != reference and ref:
                pairs = [(float(ref[r["case"]]["dice"]), float(r["dice"])) for r in mine if r["case"] in ref]
                if len(pairs) >= 2 and any(abs(a - b) > 1e-12 for a, b in pairs):
                    p = float(wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
            entry["wilcoxon_p_vs_spd"] = p
            summary.append(entry)
    return summary


LEVEL_ORDER = ["clean", "mild", "moderate", "severe"]


def _table(entries: List[dict], title: str) -> List[str]:
    lines = [title, "", "| method | view (axis) | level | n | Dice | HD95 (mm) | ASD (mm) | s per case | "
                        "Wilcoxon p vs SPD |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        p = "" if e["wilcoxon_p_vs_spd"] is None else f"{e['wilcoxon_p_vs_spd']:.2g}"
        lines.append(f"| {method_title(e['method'])} | {e['view']} ({e['axis']}) | {e['level']} | {e['n']} | "
                     f"{e['dice_mean']:.3f} ± {e['dice_sd']:.3f} | {e['hd95_mean']:.1f} ± {e['hd95_sd']:.1f} | "
                     f"{e['asd_mean']:.2f} ± {e['asd_sd']:.2f} | {e['seconds_mean']:.1f} | {p} |")
    return lines + [""]


def _main_axis(entries: List[dict]) -> int:
    """The main view of a dataset's summary: the axis evaluated at the most noise levels."""
    levels = {}
    for e in entries:
        levels.setdefault(e["axis"], set()).add(e["level"])
    return max(levels, key=lambda a: len(levels[a]))


REPORTS = ("per_case.csv", "summary.csv", "results.md", "dice_vs_noise.png", "meta.json")  # what write_reports writes


def write_reports(rows: List[dict], summary: List[dict], out_dir: Path, meta: dict) -> None:
    """per_case.csv, summary.csv, results.md (tables per dataset: main view by level, ladder, levers,
    views) and dice_vs_noise.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with OutputSet() as outputs:  # every report appears, or none (files.OutputSet: written, read back, renamed)
        _write_reports(rows, summary, out_dir, meta, {name: outputs.add(out_dir / name) for name in REPORTS}, plt)


def _write_reports(rows, summary, out_dir: Path, meta: dict, paths: dict, plt) -> None:
    for name, table in (("per_case.csv", rows), ("summary.csv", summary)):
        with open(paths[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    lines = [f"Benchmark ({meta['command']}; {meta['machine']}; {meta['date']})", ""]
    datasets = sorted({s["dataset"] for s in summary})
    for dataset in datasets:
        mine = [s for s in summary if s["dataset"] == dataset]
        main_axis = _main_axis(mine)
        main = [s for s in mine if s["axis"] == main_axis]
        lines += _table([s for s in main if s["method"] in ("sam_points", "sam_box", "sam_tuning", "unet", "spd")],
                        f"### {dataset}: baselines and SPD by noise level (main view)")
        lines += _table([s for s in main if s["level"] == "moderate" and s["method"] in
                         ("saliency", "oracle_box", "oracle_clean", "consensus", "spd", "unet")],
                        f"### {dataset}: where the Dice goes (ladder, moderate)")
        lines += _table([s for s in main if s["level"] == "moderate" and s["method"] not in METHODS],
                        f"### {dataset}: levers (moderate, main view; p against SPD as shipped)")
        lines += _table([s for s in mine if s["level"] == "moderate" and s["method"] in ("spd", "sam_box")],
                        f"### {dataset}: every view (moderate)")
    paths["results.md"].write_text("\n".join(lines))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        main_axis = _main_axis([s for s in summary if s["dataset"] == dataset])
        for method in ("sam_points", "sam_box", "sam_tuning", "unet", "spd"):
            values = [next((s["dice_mean"] for s in summary if s["dataset"] == dataset and s["level"] == lv
                            and s["method"] == method and s["axis"] == main_axis), np.nan) for lv in LEVEL_ORDER]
            if not np.all(np.isnan(values)):
                ax.plot(LEVEL_ORDER, values, marker="o", label=METHODS[method],
                        linewidth=2.5 if method == REFERENCE else 1.2)
        ax.set_title(dataset)
        ax.set_xlabel("noise level")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(paths["dice_vs_noise.png"], dpi=100)
    plt.close(fig)
    paths["meta.json"].write_text(json.dumps(meta, indent=1))


def read_rows(paths: List[Path]) -> List[dict]:
    """Per-case rows back from per_case.csv files (to merge runs or rewrite reports)."""
    rows = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for key in ("dice", "hd95", "asd", "seconds"):
                    row[key] = float(row[key])
                rows.append(row)
    return rows


def run_benchmark(args) -> None:
    from .ladder import load_store

    device = resolve_device(args.device)
    store = load_store(args.store)
    rows = read_rows([Path(p) for p in args.merge]) if args.merge else []
    out_dir = Path(args.out_dir)
    for dataset in args.datasets:
        rows += evaluate_dataset(dataset, Path(args.data_root), Path(args.models_dir), store, args.levels, args.seed,
                                 device, log=lambda line: print(line, flush=True), views=args.views,
                                 ladder_rungs=not args.no_ladder, max_cases=args.max_cases, runtime=args.runtime,
                                 precision=args.precision)
    summary = summarise(rows)
    meta = {"command": "spd " + " ".join(sys.argv[1:]), "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, device {device}",
            "runtime": f"{args.runtime}/{args.precision}"}
    write_reports(rows, summary, out_dir, meta)
    print((out_dir / "results.md").read_text())
