"""Training losses of SPD stage 2: Dice + focal (MONAI) and Pairwise Slice Consistency (PSC).

All tensors are (B, 1, H, W): ``logits`` are raw decoder outputs, ``target`` binary masks and
``prob`` sigmoid probabilities. Torch and MONAI are imported here only (training needs them;
inference does not import this module).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Tuple

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def _dice_focal():
    from monai.losses import DiceFocalLoss

    # Stateless (no parameters or buffers), so one instance serves every device and dtype.
    return DiceFocalLoss(sigmoid=True, gamma=2.0, lambda_dice=1.0, lambda_focal=1.0)


def _check(name: str, tensor: Tensor) -> None:
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"{name} must be (B, 1, H, W), got {tuple(tensor.shape)}.")


def dice_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """MONAI ``DiceFocalLoss(sigmoid=True, gamma=2, lambda_dice=1, lambda_focal=1)``, mean over the batch."""
    _check("logits", logits)
    _check("target", target)
    return _dice_focal()(logits, target.to(logits.dtype))


def pairwise_slice_consistency(prob_a: Tensor, prob_b: Tensor, eps: float = 1e-6) -> Tensor:
    """PSC loss: ``1 - soft Dice`` between the probability maps of adjacent slices, mean over B.

    Soft Dice uses squared terms in the denominator (Milletari et al., V-Net)::

        dice = (2 * sum(a * b) + eps) / (sum(a ** 2) + sum(b ** 2) + eps)

    so the loss is exactly 0 for identical maps (also soft ones, and also two empty maps) and tends
    to 1 for disjoint maps. For binary maps it equals the ordinary Dice loss.
    """
    _check("prob_a", prob_a)
    _check("prob_b", prob_b)
    if prob_a.shape != prob_b.shape:
        raise ValueError(f"PSC needs maps of one shape, got {tuple(prob_a.shape)} and {tuple(prob_b.shape)}.")
    dims = tuple(range(1, prob_a.ndim))
    intersection = (prob_a * prob_b).sum(dim=dims)
    denominator = (prob_a * prob_a).sum(dim=dims) + (prob_b * prob_b).sum(dim=dims)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return (1.0 - dice).mean()


def spd_stage2_loss(logits_t: Tensor, logits_t1: Tensor, target_t: Tensor, target_t1: Tensor,
                    psc_weight: float) -> Tuple[Tensor, Dict[str, float]]:
    """Stage-2 objective on a pair of adjacent slices t, t+1.

    ``total = dice_focal(t) + dice_focal(t+1) + psc_weight * PSC(sigmoid(logits_t), sigmoid(logits_t1))``.
    Returns ``total`` (with gradients) and its parts as floats: ``dice_focal_t``, ``dice_focal_t1``,
    ``psc`` (unweighted), ``psc_weighted`` and ``total``.
    """
    df_t = dice_focal_loss(logits_t, target_t)
    df_t1 = dice_focal_loss(logits_t1, target_t1)
    psc = pairwise_slice_consistency(torch.sigmoid(logits_t), torch.sigmoid(logits_t1))
    psc_weighted = float(psc_weight) * psc
    total = df_t + df_t1 + psc_weighted
    parts = {
        "dice_focal_t": float(df_t.detach()),
        "dice_focal_t1": float(df_t1.detach()),
        "psc": float(psc.detach()),
        "psc_weighted": float(psc_weighted.detach()),
        "total": float(total.detach()),
    }
    return total, parts


__all__ = ["dice_focal_loss", "pairwise_slice_consistency", "spd_stage2_loss"]
