"""Baseline (d): a supervised 2D U-Net without prompts (MONAI), trained on the same split.

Slices along the benchmark axis, intensities scaled as for SAM, optionally shrunk in-plane by ``shrink``
(the left atrium's 576-640 px slices cost too much CPU time at full size), zero-padded to a multiple of 16.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from ..core.progress import Progress
from ..core.volume import apply_range, get_slice, intensity_range
from .data import Case, training_slices
from .losses import dice_focal_loss


def build():
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1)


def _pad16(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % 16, 0, (-h) % 16))


def _shrunk(image: np.ndarray, shrink: int) -> torch.Tensor:
    """(H, W) -> (1, H', W') tensor, H' = H / shrink (area average); shrink 1 leaves it as it is."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    if shrink == 1:
        return x
    size = (max(1, round(x.shape[-2] / shrink)), max(1, round(x.shape[-1] / shrink)))
    return F.interpolate(x[None], size=size, mode="area")[0]


def train_unet(cases: List[Case], axis: int, out: Path, epochs: int = 20, seed: int = 0,
               progress: Progress | None = None, margin: int = 3, shrink: int = 1) -> Path:
    torch.manual_seed(seed)
    progress = progress or Progress()
    slices = []
    for case in cases:
        volume, label = case.load()
        lo, hi = intensity_range(volume.array, "auto")
        for t in training_slices(label, axis, margin):
            image = apply_range(get_slice(volume.array, axis, t), lo, hi)
            target = (_shrunk(get_slice(label, axis, t), shrink) > 0.5).float()
            slices.append((_shrunk(image, shrink), target))
    net = build()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = random.Random(seed)
    batch = 16
    steps = max(1, len(slices) // batch)
    for epoch in range(epochs):
        generator.shuffle(slices)
        for step in range(steps):
            progress.step("U-Net", epoch * steps + step, epochs * steps)
            chunk = slices[step * batch:(step + 1) * batch]
            h = max(x.shape[-2] for x, _ in chunk)
            w = max(x.shape[-1] for x, _ in chunk)
            images = torch.stack([F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2])) for x, _ in chunk])
            labels = torch.stack([F.pad(y, (0, w - y.shape[-1], 0, h - y.shape[-2])) for _, y in chunk])
            images, labels = _pad16(images), _pad16(labels)
            if generator.random() < 0.5:  # left-right flip augmentation
                images, labels = images.flip(-1), labels.flip(-1)
            loss = dice_focal_loss(net(images), labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    torch.save({"state_dict": net.state_dict(), "shrink": shrink}, out)
    return out


@torch.no_grad()
def predict(net, volume, axis: int) -> np.ndarray:
    net.eval()
    lo, hi = intensity_range(volume.array, "auto")
    mask = np.zeros(volume.shape, np.uint8)
    for t in range(volume.shape[axis]):
        plane = apply_range(get_slice(volume.array, axis, t), lo, hi)
        image = _shrunk(plane, getattr(net, "shrink", 1))[None]
        h, w = image.shape[-2:]
        logits = net(_pad16(image))[:, :, :h, :w]
        if logits.shape[-2:] != plane.shape:
            logits = F.interpolate(logits, size=plane.shape, mode="bilinear", align_corners=False)
        logits = logits[0, 0]
        index = [slice(None)] * 3
        index[axis] = t
        mask[tuple(index)] = (logits > 0).numpy()
    return mask


def load(path: Path):
    net = build()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in saved:  # the first format: the state dict alone, full-size slices
        saved = {"state_dict": saved, "shrink": 1}
    net.load_state_dict(saved["state_dict"])
    net.shrink = int(saved["shrink"])
    return net.eval()
