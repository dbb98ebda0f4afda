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
from ..core.errors import InputError
from ..core.files import OutputSet
from ..core.models.registry import load_backbone, resolve_device
from ..core.pipeline import SegmentOptions, load_model, segment
from ..core.volume import get_slice
from . import unet
from .data import find_cases, load_split, structure_range
from .metrics import dice_score, score, surface_distances
from .simulate import next_correction, simulate, with_correction

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


# ---------------------------------------------------------------- the correction benchmark

CORRECTION_METHODS = {
    "spd": "SPD (as shipped)",
    "sam_box": "LiteMedSAM raw (box around the positive clicks, negatives as negative points)",
    "oracle_5mm": "oracle: every error within 5 mm of each click fixed",
    "oracle_10mm": "oracle: every error within 10 mm of each click fixed",
}
CORRECTION_LEVELS = ["moderate", "severe", "harsh"]  # the starts of `spd evaluate --corrections`


def bundled_model_for(dataset: str):
    """The bundled SPD model of a benchmark dataset (spd-hippocampus, spd-left-atrium), or None."""
    from ..core.models.registry import BUNDLED_SPD_MODELS

    name = "spd-" + dataset.replace("_", "-")
    return name if name in BUNDLED_SPD_MODELS and BUNDLED_SPD_MODELS[name].exists() else None


def correction_run(volume, label, prompts, model, options, axis: int, clicks: int, cache) -> List[dict]:
    """One start and ``clicks`` corrections by the challenge's rule (``simulate.next_correction``), each
    placed on the newest result and added to the click list (clicks accumulate), the whole list segmented
    again. One row per step (0: the start): dice, the click's kind, seconds of that run; HD95 at the start
    and the end."""
    spacing_kji = volume.spacing[::-1]
    rows, mask = [], None
    for step in range(clicks + 1):
        kind = ""
        if step:
            click = next_correction(label, mask, axis)
            if click is not None:  # a perfect result: the same again
                prompts = with_correction(prompts, click)
                kind = "fg" if click.label else "bg"
        t0 = time.perf_counter()
        mask = segment(volume, prompts, model, options, cache=cache).mask
        row = {"step": step, "click": kind, "dice": dice_score(mask, label), "seconds": time.perf_counter() - t0,
               "hd95": ""}
        if step in (0, clicks):
            row["hd95"] = surface_distances(mask, label, spacing_kji)[0]
        rows.append(row)
    return rows


def evaluate_corrections(dataset: str, data_root: Path, models_dir, levels: List[str], clicks: int, seed: int,
                         device: str, log, cache=None, max_cases: int = 0, runtime: str = "auto",
                         precision: str = "auto") -> List[dict]:
    """Per-step rows (dataset, case, level, method, step, click, dice, hd95, seconds) of the correction benchmark
    on the dataset's full test split, main view: SPD (``models_dir/DATASET_spd.spd.safetensors``, else the
    bundled model), raw LiteMedSAM with the same click rule, and the oracle rungs (what a perfect correction
    within 5 or 10 mm of each click would give, from SPD's start). ``cache``: an ``EmbeddingCache`` (give it a
    disk folder to encode each slice once across runs); None: one in memory."""
    from ..core.cache import EmbeddingCache
    from . import ladder

    split = load_split(dataset)
    axis = int(split["axis"])
    spd_path = Path(models_dir) / f"{dataset}_spd.spd.safetensors" if models_dir else None
    spd_name = str(spd_path) if spd_path is not None and spd_path.exists() else bundled_model_for(dataset)
    if spd_name is None:
        raise InputError(f"No SPD model for {dataset}: put {dataset}_spd.spd.safetensors in --models-dir.",
                         setting="models_dir")
    spd = load_model(spd_name, device=device, runtime=runtime, precision=precision)
    backbone = load_backbone("litemedsam", device=device)
    backbone.set_runtime(runtime, precision)
    cache = cache if cache is not None else EmbeddingCache(max_bytes=4 << 30)
    runs = {"spd": (spd, SegmentOptions()), "sam_box": (backbone, SegmentOptions(mode="raw", use_box=True))}
    names = split["test_full"][:max_cases] if max_cases else split["test_full"]
    rows = []
    for index, case in enumerate(find_cases(Path(data_root) / dataset, names)):
        volume, label = case.load()
        spacing_kji = volume.spacing[::-1]
        for level in levels:
            prompts = simulate(label, axis, level, seed=10_000 + 100 * seed + index).voxel_prompts(volume)
            base = {"dataset": dataset, "case": case.name, "level": level}
            start = None
            for method, (model, options) in runs.items():
                steps = correction_run(volume, label, prompts, model, options, axis, clicks, cache)
                rows += [{**base, "method": method, **row} for row in steps]
                if method == "spd":
                    start = segment(volume, prompts, model, options, cache=cache).mask  # recalled: cheap
            for method, radius in (("oracle_5mm", 5.0), ("oracle_10mm", 10.0)):
                masks = [start] + ladder.oracle_corrections(label, start, axis, spacing_kji, radius, clicks)
                for step, mask in enumerate(masks):
                    hd95 = surface_distances(mask, label, spacing_kji)[0] if step in (0, clicks) else ""
                    rows.append({**base, "method": method, "step": step, "click": "", "dice": dice_score(mask, label),
                                 "seconds": 0.0, "hd95": hd95})
            log(f"{dataset} {case.name} {level}: " + "; ".join(
                f"{m} " + " ".join(f"{r['dice']:.3f}" for r in rows if r["case"] == case.name and r["level"] == level
                                   and r["method"] == m) for m in CORRECTION_METHODS))
    return rows


def summarise_corrections(rows: List[dict]) -> List[dict]:
    """Per (dataset, level, method): mean Dice at every step, Dice AUC (the challenge's: trapezoid over the
    correction steps 1..N, unit spacing), final Dice (mean and sd), HD95 at the start and the end, how often
    the mean Dice fell from one click to the next, and how many cases ever fell."""
    from scipy import integrate

    summary = []
    groups = list(dict.fromkeys((r["dataset"], r["level"], r["method"]) for r in rows))
    for dataset, level, method in groups:
        mine = [r for r in rows if (r["dataset"], r["level"], r["method"]) == (dataset, level, method)]
        cases = list(dict.fromkeys(r["case"] for r in mine))
        steps = max(int(r["step"]) for r in mine)
        dice = np.array([[float(next(r["dice"] for r in mine if r["case"] == c and int(r["step"]) == s))
                          for s in range(steps + 1)] for c in cases])
        hd95 = {s: np.array([float(r["hd95"]) for r in mine if int(r["step"]) == s and r["hd95"] != ""])
                for s in (0, steps)}
        auc = np.array([integrate.trapezoid(d[1:], dx=1.0) for d in dice]) if steps > 1 else np.zeros(len(cases))
        means = dice.mean(axis=0)
        seconds = [float(r["seconds"]) for r in mine if int(r["step"]) > 0]
        summary.append({"dataset": dataset, "level": level, "method": method, "n": len(cases),
                        **{f"dice_{s}": float(means[s]) for s in range(steps + 1)},
                        "final_sd": float(dice[:, -1].std(ddof=1)) if len(cases) > 1 else 0.0,
                        "auc": float(auc.mean()), "hd95_start": float(hd95[0].mean()),
                        "hd95_end": float(hd95[steps].mean()),
                        "mean_falls": int(np.sum(np.diff(means) < -1e-9)),
                        "cases_falling": int(np.sum((np.diff(dice, axis=1) < -1e-9).any(axis=1))),
                        "seconds_per_click": float(np.mean(seconds)) if seconds else 0.0})
    return summary


CORRECTION_REPORTS = ("corrections_per_step.csv", "corrections_summary.csv", "corrections.md", "dice_vs_clicks.png",
                      "corrections_meta.json")  # what write_correction_reports writes


def write_correction_reports(rows: List[dict], summary: List[dict], out_dir: Path, meta: dict) -> None:
    """corrections_per_step.csv, corrections_summary.csv, corrections.md (one table per dataset) and
    dice_vs_clicks.png (mean Dice against the number of corrections, per dataset, method and start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with OutputSet() as outputs:  # every report appears, or none
        _write_correction_reports(rows, summary, meta,
                                  {name: outputs.add(out_dir / name) for name in CORRECTION_REPORTS}, plt)


def _write_correction_reports(rows, summary, meta: dict, paths: dict, plt) -> None:
    for name, table in (("corrections_per_step.csv", rows), ("corrections_summary.csv", summary)):
        with open(paths[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    steps = max(int(k.split("_")[1]) for k in summary[0] if k.startswith("dice_"))
    lines = [f"Correction benchmark ({meta['command']}; {meta['machine']}; {meta['date']})", ""]
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    for dataset in datasets:
        lines += [f"### {dataset}: Dice after each correction (challenge click rule)", "",
                  "| start | method | n | " + " | ".join(f"Dice {s}" for s in range(steps + 1)) +
                  " | Dice AUC (1..{0}) | final Dice | HD95 start (mm) | HD95 end (mm) | mean falls | cases falling "
                  "| s per click |".format(steps),
                  "|---|---|---|" + "---|" * (steps + 1) + "---|---|---|---|---|---|---|"]
        for s in summary:
            if s["dataset"] != dataset:
                continue
            lines.append(f"| {s['level']} | {CORRECTION_METHODS.get(s['method'], s['method'])} | {s['n']} | " +
                         " | ".join(f"{s[f'dice_{k}']:.3f}" for k in range(steps + 1)) +
                         f" | {s['auc']:.3f} | {s[f'dice_{steps}']:.3f} ± {s['final_sd']:.3f} | "
                         f"{s['hd95_start']:.1f} | {s['hd95_end']:.1f} | {s['mean_falls']} | {s['cases_falling']} | "
                         f"{s['seconds_per_click']:.2f} |")
        lines.append("")
    paths["corrections.md"].write_text("\n".join(lines))
    levels = list(dict.fromkeys(s["level"] for s in summary))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    styles = {"spd": "-", "sam_box": ":", "oracle_5mm": "--", "oracle_10mm": "-."}
    for ax, dataset in zip(axes[0], datasets):
        for s in summary:
            if s["dataset"] != dataset:
                continue
            colour = f"C{levels.index(s['level'])}"
            ax.plot(range(steps + 1), [s[f"dice_{k}"] for k in range(steps + 1)], styles.get(s["method"], "-"),
                    color=colour, marker="o" if s["method"] == "spd" else None, markersize=3,
                    label=f"{s['method']} ({s['level']})")
        ax.set_title(dataset)
        ax.set_xlabel("corrections (clicks)")
        ax.set_ylabel("mean Dice")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(paths["dice_vs_clicks.png"], dpi=100)
    plt.close(fig)
    paths["corrections_meta.json"].write_text(json.dumps(meta, indent=1))


def run_correction_benchmark(args) -> None:
    """``spd evaluate --corrections N``."""
    from ..core.cache import EmbeddingCache

    device = resolve_device(args.device)
    cache = EmbeddingCache(max_bytes=4 << 30, directory=args.cache_dir) if args.cache_dir else None
    levels = args.levels or CORRECTION_LEVELS
    rows = []
    for path in args.merge:
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    for dataset in args.datasets:
        rows += evaluate_corrections(dataset, Path(args.data_root), args.models_dir, levels, args.corrections,
                                     args.seed, device, log=lambda line: print(line, flush=True), cache=cache,
                                     max_cases=args.max_cases, runtime=args.runtime, precision=args.precision)
    summary = summarise_corrections(rows)
    meta = {"command": "spd " + " ".join(sys.argv[1:]), "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, device {device}",
            "runtime": f"{args.runtime}/{args.precision}"}
    out_dir = Path(args.out_dir)
    write_correction_reports(rows, summary, out_dir, meta)
    print((out_dir / "corrections.md").read_text())
