"""Stage 1 of SPD: an anatomical prior from the image encoder's features.

Two heads map the encoder embedding (C x E x E) to one saliency logit map, brought to slice
resolution with the same crop/resize as SAM's masks (``Backbone.to_slice``):

- :class:`SaliencyHead`, the first design: two 3x3 convolutions at embedding resolution.
- :class:`ContextSaliencyHead`: a 1x1 reduction, residual blocks with growing dilation, optional
  2.5D context (the embeddings of ``context`` slices on each side), transposed-convolution
  upsampling to the model frame and an optional refinement with the slice's own pixels.
  Measured against the first design in docs/benchmarks.md ("Where the Dice goes").

:func:`build_head` makes either from a model header; :func:`head_input` assembles what a head reads
for a slice t from any ``t -> embedding`` mapping, so training (feature store) and inference
(embedding cache) feed a head the same way. In ``lora`` mode, low-rank adapters in the encoder's
attention (the ``qkv`` projections) train with the head; in ``frozen`` mode the encoder is
untouched, so embeddings can be cached.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self.context, self.uses_image = 0, False

    @property
    def spec(self) -> dict:
        return {"type": "conv2", "hidden": self.hidden}

    def forward(self, embeddings: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(embeddings)


FINE_CHANNELS = 16  # channels of the context head above embedding resolution


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class _Residual(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation), _norm(channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), _norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class ContextSaliencyHead(nn.Module):
    """Saliency from the slice's embedding, its neighbours' and (optionally) its pixels.

    Args:
      in_channels: C, the embedding's channels.
      hidden: channels of the residual blocks (halved at each upsampling step).
      blocks: residual blocks; dilations cycle 1, 2, 4, 1 so the receptive field spans the slice.
      context: neighbour slices read on each side (0: 2D). Their embeddings share the reduction and
        are mixed by a 1x1 convolution, which gives the head the structure's 3D shape.
      upsample: 2x steps above embedding resolution (bilinear, on a few channels, then a 3x3 refinement):
        0 gives E x E logits, 1 gives 2E x 2E.
      image: the refinement also reads the slice's pixels (the padded model input, one channel,
        area-averaged to the output size).

    Input: embeddings (B, 2 * context + 1, C, E, E), the centre slice in the middle (or (B, C, E, E)
    when context is 0) and, with ``image``, the model input's pixels (B, S, S).
    Output: logits (B, 1, 2^upsample E, 2^upsample E) in the model frame.
    """

    def __init__(self, in_channels: int = 256, hidden: int = 64, blocks: int = 2, context: int = 1,
                 image: bool = True, upsample: int = 1):
        super().__init__()
        self.in_channels, self.hidden, self.blocks = in_channels, hidden, blocks
        self.context, self.uses_image, self.upsample_steps = int(context), bool(image), int(upsample)
        k = 2 * self.context + 1
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), _norm(hidden), nn.GELU())
        self.mix = nn.Sequential(nn.Conv2d(k * hidden, hidden, 1), _norm(hidden), nn.GELU()) if k > 1 else nn.Identity()
        self.body = nn.Sequential(*[_Residual(hidden, (1, 2, 4, 1)[i % 4]) for i in range(blocks)])
        # above embedding resolution only a few channels: a 3x3 convolution over 64 channels at 2E costs more
        # than the whole head below it on a CPU
        channels = FINE_CHANNELS
        self.narrow = nn.Sequential(nn.Conv2d(hidden, channels, 1), _norm(channels), nn.GELU())
        self.upsample = nn.Upsample(scale_factor=2 ** self.upsample_steps, mode="bilinear", align_corners=False) \
            if self.upsample_steps else nn.Identity()
        self.refine = nn.Sequential(nn.Conv2d(channels + int(self.uses_image), channels, 3, padding=1), _norm(channels),
                                    nn.GELU())
        self.out = nn.Conv2d(channels, 1, 1)

    @property
    def spec(self) -> dict:
        return {"type": "context", "hidden": self.hidden, "blocks": self.blocks, "context": self.context,
                "image": self.uses_image, "upsample": self.upsample_steps}

    def forward(self, embeddings: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        if embeddings.dim() == 4:
            embeddings = embeddings[:, None]
        b, k = embeddings.shape[:2]
        x = self.reduce(embeddings.flatten(0, 1))
        x = self.mix(x.reshape(b, k * x.shape[1], *x.shape[-2:]))
        x = self.upsample(self.narrow(self.body(x)))
        if self.uses_image:
            if image is None:
                raise ValueError("this saliency head refines with the slice's pixels: pass image")
            image = F.interpolate(image[:, None].to(x.dtype), size=x.shape[-2:], mode="area")
            x = torch.cat([x, image], 1)
        return self.out(self.refine(x))


def build_head(spec: Optional[Mapping], in_channels: int, legacy_hidden: int = 64) -> nn.Module:
    """The head a model header describes (``header["head"]``); None: the first design (``head_hidden``)."""
    if not spec or spec.get("type") == "conv2":
        return SaliencyHead(in_channels, int((spec or {}).get("hidden", legacy_hidden)))
    if spec.get("type") != "context":
        raise ValueError(f"unknown saliency head type {spec.get('type')!r}")
    return ContextSaliencyHead(in_channels, int(spec["hidden"]), int(spec["blocks"]), int(spec["context"]),
                               bool(spec["image"]), int(spec.get("upsample", 1)))


def neighbourhood(t: int, context: int, available: Sequence[int]) -> Tuple[int, ...]:
    """Slices a head reads for slice t: t-context..t+context, each replaced by the nearest available
    slice towards t where it is missing (the volume's edge, or the end of what was encoded)."""
    have = set(available)
    out = []
    for d in range(-context, context + 1):
        s = t + d
        while s not in have and s != t:
            s += 1 if d < 0 else -1
        out.append(s)
    return tuple(out)


def head_input(head: nn.Module, ts: Sequence[int], embedding_of: Callable[[int], torch.Tensor],
               available: Sequence[int], image_of: Optional[Callable[[int], torch.Tensor]] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(embeddings, image) for a batch of slices ``ts``: what ``head(*head_input(...))`` reads.

    ``embedding_of(t)`` gives a (C, E, E) tensor for every t in ``available``; ``image_of(t)`` the
    slice's pixels in the model frame (S, S), needed when the head refines with pixels.
    """
    context = getattr(head, "context", 0)
    if context:
        embeddings = torch.stack([torch.stack([embedding_of(s) for s in neighbourhood(t, context, available)])
                                  for t in ts])
    else:
        embeddings = torch.stack([embedding_of(t) for t in ts])
    image = torch.stack([image_of(t) for t in ts]).float() if getattr(head, "uses_image", False) else None
    return embeddings, image


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
