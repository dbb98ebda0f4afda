"""One small interface over every SAM-family network.

``encode(images) -> embeddings`` and ``decode(embeddings, points, labels, boxes) -> logits, score``;
``prepare``/``to_slice`` move between a 2D slice and the padded model input (see transform.SliceTransform).
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RuntimeChoiceError, SPDWarning
from . import openvino_runtime
from .transform import SliceTransform

IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
RUNTIMES = ("auto", "torch", "openvino")
# bf16 is the CPU default only because its Dice was measured within 0.5 points of fp32 on the benchmark
# (docs/performance.md, scripts/precision_check.py); set False to make fp32 the default.
AUTO_BF16 = True


class Backbone(nn.Module):
    def __init__(self, name: str, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 input_size: int, pixel_normalisation: str = "unit", checksum: Optional[str] = None):
        super().__init__()
        self.name = name
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = int(input_size)
        self.pixel_normalisation = pixel_normalisation
        self.checksum = checksum
        self.runtime = None  # an OpenVINORuntime for CPU inference (set_runtime), else eager PyTorch
        self.precision = "fp32"

    # ------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.prompt_encoder.embed_dim)

    @property
    def identity(self) -> str:
        """What the embedding cache keys on: architecture, weights, and a reduced precision (bf16 or
        int8 embeddings differ from fp32 ones by several percent)."""
        reduced = "" if self.precision == "fp32" else f"+{self.precision}"
        return f"{self.name}@{(self.checksum or 'random')[:16]}{reduced}"

    @property
    def runtime_name(self) -> str:
        return ("openvino" if self.runtime is not None else "torch") + f"-{self.precision}"

    def transform(self, height: int, width: int) -> SliceTransform:
        return SliceTransform(height, width, self.input_size)

    def prepare(self, slices: Sequence[np.ndarray]) -> torch.Tensor:
        """Slices already scaled to [0, 1] (h, w) -> model input (B, 3, S, S) on the model's device."""
        out = torch.zeros(len(slices), 3, self.input_size, self.input_size)
        for b, image in enumerate(slices):
            tf = self.transform(*image.shape)
            rh, rw = tf.resized_hw
            x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
            out[b, :, :rh, :rw] = x[0, 0]
        if self.pixel_normalisation == "imagenet255":  # SAM: normalise, and padding stays 0 after
            valid = out != 0
            out = torch.where(valid, (out * 255.0 - IMAGENET_MEAN) / IMAGENET_STD, out)
        return out.to(self.device)

    # ------------------------------------------------------------ network
    def use_channels_last(self) -> "Backbone":
        """Channels-last convolutions: ~25 % faster LiteMedSAM encoding on a 2-core CPU (docs/performance.md)."""
        self.image_encoder.to(memory_format=torch.channels_last)
        self._channels_last = True
        return self

    def set_runtime(self, runtime: str = "auto", precision: str = "auto") -> "Backbone":
        """Choose how inference runs (training always uses eager PyTorch with gradients).

        runtime "auto": OpenVINO on a CPU when it is installed, else PyTorch; "torch"; "openvino".
        precision "auto": bf16 with OpenVINO on a CPU that has native bf16, else fp32; "fp32"; "bf16"
        (with PyTorch: autocast). Measured speed and Dice of each choice: docs/performance.md.
        The environment variables SPDSEGMENT_RUNTIME and SPDSEGMENT_PRECISION replace "auto" (for
        Slicer, where there is no command line).
        """
        if runtime == "auto":
            runtime = os.environ.get("SPDSEGMENT_RUNTIME", "auto")
        if precision == "auto":
            precision = os.environ.get("SPDSEGMENT_PRECISION", "auto")
        if runtime not in RUNTIMES:
            raise RuntimeChoiceError(f"The runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}.",
                                     setting="runtime")
        if precision not in ("auto",) + openvino_runtime.PRECISIONS:
            raise RuntimeChoiceError(f"The precision must be one of auto, {', '.join(openvino_runtime.PRECISIONS)}, not "
                                     f"{precision!r}.", setting="precision")
        on_cpu = self.device.type == "cpu"
        if runtime == "openvino" and not on_cpu:
            raise RuntimeChoiceError("The OpenVINO runtime runs on the CPU; choose the torch runtime with a GPU.",
                                     setting="runtime")
        if runtime == "openvino" and not openvino_runtime.available():
            raise RuntimeChoiceError("The OpenVINO runtime needs the openvino package (pip install openvino); or "
                                     "choose the torch runtime.", setting="runtime")
        if precision == "int8" and (runtime == "torch" or not on_cpu or not openvino_runtime.available()):
            raise RuntimeChoiceError("The int8 precision runs on the CPU with OpenVINO (pip install openvino nncf); "
                                     "choose bf16 or fp32 here.", setting="precision")
        use_openvino = runtime == "openvino" or (runtime == "auto" and on_cpu and openvino_runtime.available())
        eager_precision = "fp32" if precision in ("auto", "int8") else precision  # if OpenVINO cannot be used
        if precision == "auto":
            precision = "bf16" if use_openvino and AUTO_BF16 and openvino_runtime.cpu_supports_bf16() else "fp32"
        self.runtime = None
        if use_openvino:
            try:
                self.runtime = openvino_runtime.OpenVINORuntime(self, precision)
            except (OSError, RuntimeError) as exc:  # its converted model cannot be written (a full disk, a cache folder)
                if runtime == "openvino":
                    raise RuntimeChoiceError(f"The OpenVINO runtime could not save its converted model ({exc}); free "
                                             "space in the cache folder or choose the torch runtime.",
                                             setting="runtime") from exc
                warnings.warn(SPDWarning(f"The model could not be converted for OpenVINO ({exc}); this run uses "
                                         "PyTorch instead (slower on a CPU)."), stacklevel=2)
                precision = eager_precision
        self.precision = precision
        return self

    def _autocast(self):  # eager PyTorch: bf16 autocast (int8 never reaches here)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _use_runtime(self) -> bool:
        return self.runtime is not None and not torch.is_grad_enabled()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self._use_runtime():
            return self.runtime.encode(images)
        if getattr(self, "_channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.image_encoder(images).float()

    def decode(self, embeddings: torch.Tensor, points: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
               mask_input: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batched decode: one prompt set per embedding.

        points (B, N, 2) model xy with labels (B, N) (1 foreground, 0 background, -1 padding);
        boxes (B, 4) model x0 y0 x1 y1. Returns low-resolution logits (B, 1, 4E, 4E) and IoU scores (B,).
        """
        if points is None and boxes is None:
            raise ValueError("decode needs points or boxes")
        if self._use_runtime():
            return self.runtime.decode(embeddings, points, labels, boxes, mask_input)
        point_arg = None if points is None else (points.to(embeddings.device), labels.to(embeddings.device))
        box_arg = None if boxes is None else boxes.to(embeddings.device)[:, None, :]
        with self._autocast():
            sparse, dense = self.prompt_encoder(points=point_arg, boxes=box_arg, masks=mask_input)
            logits, iou = self.mask_decoder(image_embeddings=embeddings,
                                            image_pe=self.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False)
        return logits.float(), iou[:, 0].float()

    def mask_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, h, w) in the model frame -> SAM's dense mask prompt size (B, 1, 4E, 4E)."""
        size = tuple(4 * s for s in self.prompt_encoder.image_embedding_size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def to_slice(self, low_res_logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Low-resolution logits (B, 1, L, L) -> logits on the slice grid (B, h, w)."""
        tf = self.transform(height, width)
        rh, rw = tf.resized_hw
        x = F.interpolate(low_res_logits, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False)
        x = x[..., :rh, :rw]
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def pad_points(point_sets: List[np.ndarray], label_sets: Optional[List[np.ndarray]] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists of (n_i, 2) model-xy points -> (B, N, 2) and labels padded with -1."""
    n = max(1, max((len(p) for p in point_sets), default=1))
    points = torch.zeros(len(point_sets), n, 2)
    labels = -torch.ones(len(point_sets), n)
    for b, p in enumerate(point_sets):
        if len(p):
            points[b, : len(p)] = torch.as_tensor(np.asarray(p, float), dtype=torch.float32)
            lab = np.ones(len(p)) if label_sets is None else np.asarray(label_sets[b], float)
            labels[b, : len(p)] = torch.as_tensor(lab, dtype=torch.float32)
    return points, labels
