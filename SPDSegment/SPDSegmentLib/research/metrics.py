"""Segmentation metrics of the benchmark: 3D Dice, HD95 and ASD in millimetres.

An empty prediction has no surface: its HD95 and ASD are set to the diagonal of the image (the largest
possible distance), so that failures count against a method instead of disappearing from the mean.
"""
from __future__ import annotations

import numpy as np
import torch


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


def score(mask: np.ndarray, label: np.ndarray, spacing_kji) -> dict:
    """{"dice", "hd95", "asd"} of one mask against its label."""
    hd95, asd = surface_distances(mask, label, spacing_kji)
    return {"dice": dice_score(mask, label), "hd95": hd95, "asd": asd}
