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
import torch
from scipy.stats import wilcoxon

from ..core import spd_model
from ..core.cache import EmbeddingCache
from ..core.models.registry import load_backbone, resolve_device
from ..core.pipeline import SegmentOptions, segment
from ..core.volume import get_slice
from . import unet
from .data import find_cases, load_split, structure_range
from .simulate import simulate

# MONAI and matplotlib (the "train" extra) are imported where they are used: the demo's Dice needs neither.

METHODS = {
    "sam_points": "SAM zero-shot, raw points",
    "sam_box": "SAM zero-shot, box around raw points",
    "sam_tuning": "SAM-Tuning (decoder tuned on raw points)",
    "unet": "Supervised 2D U-Net (no prompts)",
    "spd_local": "SPD ablation: local validation only",
    "spd_no_psc": "SPD ablation: CPD without PSC",
    "spd": "SPD, empty slices skipped",
    "spd_dense": "SPD + dense saliency prompt",
    "spd_fill": "SPD (default: empty slices from saliency)",
}
REFERENCE = "spd_fill"  # what the Wilcoxon tests compare against: SPD as shipped


def dice_score(prediction: np.ndarray, label: np.ndarray) -> float:
    p, g = prediction > 0, label > 0
    denominator = p.sum() + g.sum()
    return 1.0 if denominator == 0 else float(2.0 * (p & g).sum() / denominator)


def surface_distances(prediction: np.ndarray, label: np.ndarray, spacing_kji) -> tuple:
    """(HD95, ASD) in mm with MONAI; the image diagonal when either mask is empty."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, g = prediction > 0, label > 0
    if not p.any() or not g.any():
        diagonal = float(np.linalg.norm(np.array(prediction.shape) * np.asarray(spacing_kji)))
        return diagonal, diagonal
    y_pred = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
    y = torch.from_numpy(np.stack([~g, g])[None].astype(np.float32))
    spacing = [float(s) for s in spacing_kji]
    hd95 = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing)
    asd = compute_average_surface_distance(y_pred, y, include_background=False, symmetric=True, spacing=spacing)
    return float(hd95.item()), float(asd.item())


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

def _model_files(models_dir: Path, dataset: str) -> Dict[str, Path]:
    return {"spd": models_dir / f"{dataset}_spd.spd.safetensors",
            "spd_no_psc": models_dir / f"{dataset}_spd_nopsc.spd.safetensors",
            "sam_tuning": models_dir / f"{dataset}_samtune.spd.safetensors",
            "spd_dense": models_dir / f"{dataset}_spd_dense.spd.safetensors",
            "unet": models_dir / f"{dataset}_unet.pt"}


def evaluate_dataset(dataset: str, data_root: Path, models_dir: Path, levels: List[str], seed: int, cache,
                     device: str, log, unet_epochs: int = 30, runtime: str = "torch",
                     precision: str = "fp32") -> List[dict]:
    split = load_split(dataset)
    axis = int(split["axis"])
    files = _model_files(models_dir, dataset)
    backbone = load_backbone("litemedsam", device=device)
    models = {"sam_points": (backbone, SegmentOptions(mode="raw", use_box=False)),
              "sam_box": (backbone, SegmentOptions(mode="raw", use_box=True))}
    if files["sam_tuning"].exists():
        models["sam_tuning"] = (spd_model.load(files["sam_tuning"], device), SegmentOptions(mode="raw", use_box=True))
    if files["spd"].exists():
        spd = spd_model.load(files["spd"], device)
        models["spd_local"] = (spd, SegmentOptions(mode="spd", local_only=True, empty_slice="skip"))
        models["spd"] = (spd, SegmentOptions(mode="spd", empty_slice="skip"))
        models["spd_fill"] = (spd, SegmentOptions(mode="spd", empty_slice="saliency"))
    if files["spd_dense"].exists():
        models["spd_dense"] = (spd_model.load(files["spd_dense"], device),
                               SegmentOptions(mode="spd", empty_slice="skip"))
    if files["spd_no_psc"].exists():
        models["spd_no_psc"] = (spd_model.load(files["spd_no_psc"], device),
                                SegmentOptions(mode="spd", empty_slice="skip"))
    if not files["unet"].exists() and unet_epochs > 0:  # baseline (d) trains on the same split
        log(f"{dataset}: training the U-Net baseline ({unet_epochs} epochs)")
        unet.train_unet(find_cases(data_root / dataset, split["train"]), axis, files["unet"], epochs=unet_epochs,
                        seed=seed)
    for backbone in {id(b): b for b in (getattr(m, "backbone", m) for m, _ in models.values())}.values():
        backbone.set_runtime(runtime, precision)
    unet_net = unet.load(files["unet"]) if files["unet"].exists() else None
    rows = []
    for index, case in enumerate(find_cases(data_root / dataset, split["test"])):
        volume, label = case.load()
        spacing_kji = volume.spacing[::-1]
        unet_scores = None
        if unet_net is not None:
            unet_mask = unet.predict(unet_net, volume, axis)
            unet_scores = (dice_score(unet_mask, label), *surface_distances(unet_mask, label, spacing_kji))
        for level in levels:
            sim = simulate(label, axis, level, seed=10_000 + 100 * seed + index)
            voxel_prompts = sim.voxel_prompts(volume)
            for method, (model, options) in models.items():
                t0 = time.perf_counter()
                result = segment(volume, voxel_prompts, model, options, cache=cache)
                seconds = time.perf_counter() - t0
                hd95, asd = surface_distances(result.mask, label, spacing_kji)
                rows.append(dict(dataset=dataset, case=case.name, level=level, method=method,
                                 dice=dice_score(result.mask, label), hd95=hd95, asd=asd, seconds=seconds))
            if unet_scores is not None:
                rows.append(dict(dataset=dataset, case=case.name, level=level, method="unet", dice=unet_scores[0],
                                 hd95=unet_scores[1], asd=unet_scores[2], seconds=0.0))
            log(f"{dataset} {case.name} {level}: " + ", ".join(
                f"{r['method']} {r['dice']:.3f}" for r in rows if r["case"] == case.name and r["level"] == level))
    return rows


def summarise(rows: List[dict], levels: List[str], reference: str = REFERENCE) -> List[dict]:
    if not any(r["method"] == reference for r in rows):
        reference = "spd"
    summary = []
    for dataset in sorted({r["dataset"] for r in rows}):
        for level in levels:
            subset = [r for r in rows if r["dataset"] == dataset and r["level"] == level]
            spd = {r["case"]: r for r in subset if r["method"] == reference}
            for method in METHODS:
                mine = [r for r in subset if r["method"] == method]
                if not mine:
                    continue
                entry = {"dataset": dataset, "level": level, "method": method, "n": len(mine)}
                for metric in ("dice", "hd95", "asd"):
                    values = np.array([r[metric] for r in mine], float)
                    entry[f"{metric}_mean"], entry[f"{metric}_sd"] = float(values.mean()), float(values.std(ddof=1)) \
                        if len(values) > 1 else 0.0
                p = None
                if method != reference and spd:
                    pairs = [(spd[r["case"]]["dice"], r["dice"]) for r in mine if r["case"] in spd]
                    diffs = [a - b for a, b in pairs]
                    if len(pairs) >= 2 and any(abs(d) > 1e-12 for d in diffs):
                        p = float(wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
                entry["wilcoxon_p_vs_spd"] = p
                entry["reference"] = reference
                summary.append(entry)
    return summary


def write_reports(rows: List[dict], summary: List[dict], levels: List[str], out_dir: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    lines = [f"Benchmark ({meta['command']}; {meta['machine']}; {meta['date']})", ""]
    for dataset in sorted({s["dataset"] for s in summary}):
        n = max(s["n"] for s in summary if s["dataset"] == dataset)
        lines += [f"### {dataset} ({n} test cases)", "",
                  "| method | level | Dice | HD95 (mm) | ASD (mm) | Wilcoxon p (Dice vs SPD default) |",
                  "|---|---|---|---|---|---|"]
        for s in (s for s in summary if s["dataset"] == dataset):
            p = "" if s["wilcoxon_p_vs_spd"] is None else f"{s['wilcoxon_p_vs_spd']:.3g}"
            lines.append(f"| {METHODS[s['method']]} | {s['level']} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | "
                         f"{s['hd95_mean']:.1f} ± {s['hd95_sd']:.1f} | {s['asd_mean']:.2f} ± {s['asd_sd']:.2f} | {p} |")
        lines.append("")
    (out_dir / "results.md").write_text("\n".join(lines))
    datasets = sorted({s["dataset"] for s in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, title in METHODS.items():
            values = [next((s["dice_mean"] for s in summary if s["dataset"] == dataset and s["level"] == lv
                            and s["method"] == method), np.nan) for lv in levels]
            if not np.all(np.isnan(values)):
                ax.plot(levels, values, marker="o", label=title, linewidth=2.5 if method == REFERENCE else 1.2)
        ax.set_title(dataset)
        ax.set_xlabel("noise level")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "dice_vs_noise.png", dpi=100)
    plt.close(fig)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))


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
    device = resolve_device(args.device)
    cache = EmbeddingCache(max_bytes=2 << 30, directory=args.cache_dir)
    rows = read_rows([Path(p) for p in args.merge]) if args.merge else []
    for dataset in args.datasets:
        rows += evaluate_dataset(dataset, Path(args.data_root), Path(args.models_dir), args.levels, args.seed,
                                 cache, device, log=lambda line: print(line, flush=True),
                                 unet_epochs=args.unet_epochs, runtime=args.runtime, precision=args.precision)
    summary = summarise(rows, args.levels)
    meta = {"command": "spd " + " ".join(sys.argv[1:]), "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, device {device}",
            "runtime": f"{args.runtime}/{args.precision}"}
    write_reports(rows, summary, args.levels, Path(args.out_dir), meta)
    print((Path(args.out_dir) / "results.md").read_text())
