"""Baseline (d): a supervised 2D U-Net without prompts (MONAI), trained on the same split.

Slices along the benchmark axis, intensities scaled as for SAM, zero-padded to a multiple of 16.
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


def train_unet(cases: List[Case], axis: int, out: Path, epochs: int = 20, seed: int = 0,
               progress: Progress | None = None, margin: int = 3) -> Path:
    torch.manual_seed(seed)
    progress = progress or Progress()
    slices = []
    for case in cases:
        volume, label = case.load()
        lo, hi = intensity_range(volume.array, "auto")
        for t in training_slices(label, axis, margin):
            image = apply_range(get_slice(volume.array, axis, t), lo, hi)
            slices.append((torch.from_numpy(image)[None], torch.from_numpy(get_slice(label, axis, t).astype(np.float32))[None]))
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
    torch.save(net.state_dict(), out)
    return out


@torch.no_grad()
def predict(net, volume, axis: int) -> np.ndarray:
    net.eval()
    lo, hi = intensity_range(volume.array, "auto")
    mask = np.zeros(volume.shape, np.uint8)
    for t in range(volume.shape[axis]):
        image = torch.from_numpy(apply_range(get_slice(volume.array, axis, t), lo, hi))[None, None]
        h, w = image.shape[-2:]
        logits = net(_pad16(image))[0, 0, :h, :w]
        index = [slice(None)] * 3
        index[axis] = t
        mask[tuple(index)] = (logits > 0).numpy()
    return mask


def load(path: Path):
    net = build()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()
