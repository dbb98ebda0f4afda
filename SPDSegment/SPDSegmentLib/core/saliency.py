"""Stage 1 of SPD: an anatomical prior from the image encoder's features.

A light convolutional head maps the encoder embedding (C x E x E) to one saliency logit map at
embedding resolution; it is brought to slice resolution with the same crop/resize as SAM's masks.
In ``lora`` mode, low-rank adapters in the encoder's attention (the ``qkv`` projections) are trained
with the head; in ``frozen`` mode (CPU) the encoder is untouched, so embeddings can be cached.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class SaliencyHead(nn.Module):
    """Two 3x3 conv blocks and a 1x1 projection (about 0.2 M parameters for C = 256).

    Why this design: the embedding is already a 64 x 64 semantic map; a receptive field of a few
    embedding pixels is enough to say "this is hippocampus", and a small head trains in minutes on
    a CPU from cached embeddings without overfitting a few dozen cases.
    """

    def __init__(self, in_channels: int = 256, hidden: int = 64):
        super().__init__()
        groups = 8 if hidden % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.GELU(),
            nn.Conv2d(hidden, 1, 1),
        )
        self.in_channels, self.hidden = in_channels, hidden

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings)


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen; B starts at zero so training starts from SAM."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = (alpha or rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(encoder: nn.Module, rank: int) -> int:
    """Wrap every attention ``qkv`` Linear of the encoder with LoRA; returns how many were wrapped."""
    if rank <= 0:
        return 0
    targets = [(name, module) for name, module in encoder.named_modules()
               if name.endswith("qkv") and isinstance(module, nn.Linear)]
    for name, module in targets:
        parent = encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else encoder
        setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(module, rank))
    return len(targets)


def lora_state(encoder: nn.Module) -> dict:
    return {k: v for k, v in encoder.state_dict().items() if ".lora_" in k}
