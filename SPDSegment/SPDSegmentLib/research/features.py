"""A feature store: the frozen encoder's embeddings of every labelled slice, on disk, int8.

Training in frozen mode and the benchmark read embeddings many times; encoding them once costs
about 0.3 s a slice on a 2-core CPU. One case and slicing axis is one entry:
``ROOT/DATASET/CASE/axis{a}.q.npy`` (int8, (n, C, E, E)), ``axis{a}.scale.npy`` (float16, (n, C):
per slice and channel, value = q * scale) and ``axis{a}.json`` (the slices, the intensity range,
the backbone identity and the embedding-cache key). The JSON is written last, so a half-written
entry is never read. int8 with a per-channel scale halves fp16's size; its error is measured in
docs/benchmarks.md against the encoder's own bf16 error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..core.files import atomic_write
from ..core.volume import apply_range, fingerprint_key, get_slice, intensity_range
from .data import training_slices

MARGIN = 3  # slices stored beyond the structure on each side (CPD borrows from n = 2 neighbours)


def quantise(embeddings: np.ndarray):
    """(n, C, E, E) float -> int8 values and float16 (n, C) scales."""
    absmax = np.abs(embeddings).reshape(*embeddings.shape[:2], -1).max(-1)
    scale = np.maximum(absmax, 1e-8) / 127.0
    q = np.clip(np.rint(embeddings / scale[..., None, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float16)


def dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None, None]


class FeatureEntry:
    """One case along one axis: ``embedding(t)`` for each stored slice t."""

    def __init__(self, folder: Path, axis: int):
        self.meta = json.loads((folder / f"axis{axis}.json").read_text())
        self.slices: List[int] = list(self.meta["slices"])
        self.index = {t: i for i, t in enumerate(self.slices)}
        self.q = np.load(folder / f"axis{axis}.q.npy", mmap_mode="r")
        self.scale = np.load(folder / f"axis{axis}.scale.npy")

    def embedding(self, t: int) -> np.ndarray:
        i = self.index[t]
        return dequantise(self.q[i], self.scale[i])

    def embeddings(self, ts) -> np.ndarray:
        idx = [self.index[t] for t in ts]
        return dequantise(self.q[idx], self.scale[idx])


class FeatureStore:
    def __init__(self, root: os.PathLike):
        self.root = Path(root)

    def folder(self, dataset: str, case: str) -> Path:
        return self.root / dataset / case

    def has(self, dataset: str, case: str, axis: int) -> bool:
        return (self.folder(dataset, case) / f"axis{axis}.json").exists()

    def entry(self, dataset: str, case: str, axis: int) -> FeatureEntry:
        return FeatureEntry(self.folder(dataset, case), axis)

    def write(self, dataset: str, case: str, axis: int, slices: List[int], embeddings: np.ndarray,
              meta: Dict) -> None:
        folder = self.folder(dataset, case)
        q, scale = quantise(embeddings)
        for suffix, array in (("q", q), ("scale", scale)):
            with atomic_write(folder / f"axis{axis}.{suffix}.npy") as tmp:
                np.save(tmp, array)
        with atomic_write(folder / f"axis{axis}.json") as tmp:  # last: it marks the entry complete
            tmp.write_text(json.dumps({**meta, "slices": [int(t) for t in slices]}))


def encode_case(store: FeatureStore, dataset: str, case, axis: int, backbone, margin: int = MARGIN,
                modality: str = "auto", progress=None) -> int:
    """Encode one case along one axis into the store (skipped when present); returns slices encoded."""
    if store.has(dataset, case.name, axis):
        return 0
    volume, label = case.load()
    slices = training_slices(label, axis, margin)
    intensity = intensity_range(volume.array, modality)
    out = []
    with torch.inference_mode():
        for i, t in enumerate(slices):
            if progress is not None:
                progress.step(f"encode {case.name}", i, len(slices))
            image = apply_range(get_slice(volume.array, axis, t), *intensity)
            out.append(backbone.encode(backbone.prepare([image])).float().cpu().numpy()[0])
    meta = {"intensity": list(intensity), "identity": backbone.identity, "shape": list(volume.shape),
            "key": fingerprint_key(volume, axis, backbone.identity, intensity), "axis": axis}
    store.write(dataset, case.name, axis, slices, np.stack(out), meta)
    return len(slices)
