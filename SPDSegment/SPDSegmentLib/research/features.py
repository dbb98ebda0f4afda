"""A feature store: the frozen encoder's embeddings of every labelled slice, on disk, int8.

Training in frozen mode and the benchmark read embeddings many times; encoding them once costs
about 0.3 s a slice on a 2-core CPU. One case and slicing axis is one entry:
``ROOT/DATASET/CASE/axis{a}.q.npy`` (int8, (n, C, E, E)), ``axis{a}.scale.npy`` (float16, (n, C):
per slice and channel, value = q * scale) and ``axis{a}.json`` (the slices, the intensity range,
the backbone identity and the embedding-cache key). The JSON is written last, so a half-written
entry is never read; an entry damaged later (a file cut short, arrays that do not fit its slices) counts
as missing, with a warning, and is encoded again. int8 with a per-channel scale halves fp16's size; its
error is measured in docs/benchmarks.md against the encoder's own bf16 error.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from ..core.errors import InputError, SPDWarning
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
        """Open an entry; ValueError (or OSError) if a file is cut short or the parts do not fit together."""
        self.meta = json.loads((folder / f"axis{axis}.json").read_text(encoding="utf-8"))
        self.slices: List[int] = [int(t) for t in self.meta["slices"]]
        self.index = {t: i for i, t in enumerate(self.slices)}
        self.q = np.load(folder / f"axis{axis}.q.npy", mmap_mode="r", allow_pickle=False)  # a cut file: ValueError
        self.scale = np.load(folder / f"axis{axis}.scale.npy", allow_pickle=False)
        if (self.q.ndim != 4 or self.q.dtype != np.int8 or self.q.shape[0] != len(self.slices)
                or self.scale.shape != self.q.shape[:2] or not np.isfinite(self.scale).all()):
            raise ValueError(f"its arrays {self.q.shape} and {self.scale.shape} do not fit its {len(self.slices)} "
                             "slices")
        self.fresh = False  # set by encode_case when it has just encoded this entry

    def embedding(self, t: int) -> np.ndarray:
        i = self.index[t]
        return dequantise(self.q[i], self.scale[i])

    def embeddings(self, ts) -> np.ndarray:
        idx = [self.index[t] for t in ts]
        return dequantise(self.q[idx], self.scale[idx])

    def as_mapping(self) -> "EmbeddingView":
        """A read-only ``t -> torch tensor (C, E, E)`` mapping over the stored slices (what
        ``pipeline.saliency_maps`` and the decoder read at inference, from the embedding cache)."""
        return EmbeddingView(self)


class EmbeddingView(Mapping):
    def __init__(self, entry: FeatureEntry):
        self.entry = entry

    def __getitem__(self, t):
        import torch

        if t not in self.entry.index:
            raise KeyError(t)
        return torch.from_numpy(self.entry.embedding(t))

    def __iter__(self) -> Iterator[int]:
        return iter(self.entry.slices)

    def __len__(self) -> int:
        return len(self.entry.slices)


class FeatureStore:
    def __init__(self, root: os.PathLike):
        self.root = Path(root)

    def folder(self, dataset: str, case: str) -> Path:
        return self.root / dataset / case

    def read(self, dataset: str, case: str, axis: int) -> Optional[FeatureEntry]:
        """The entry, or None when it is missing or damaged (then with a warning: it is encoded again)."""
        folder = self.folder(dataset, case)
        if not (folder / f"axis{axis}.json").exists():
            return None
        try:
            return FeatureEntry(folder, axis)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a cut .npy, JSON that is not an entry, ...
            warnings.warn(SPDWarning(f"The feature store's entry {folder / f'axis{axis}'} is damaged ({exc}); it is "
                                     "treated as missing and encoded again."), stacklevel=2)
            return None

    def has(self, dataset: str, case: str, axis: int) -> bool:
        """Whether the store holds a complete, readable entry for this case and axis."""
        return self.read(dataset, case, axis) is not None

    def entry(self, dataset: str, case: str, axis: int) -> FeatureEntry:
        entry = self.read(dataset, case, axis)
        if entry is None:
            raise InputError(f"The feature store {self.root} holds no usable entry for {dataset} {case} along axis "
                             f"{axis}; encode it again (scripts/encode_features.py).")
        return entry

    def has_valid(self, dataset: str, case: str, volume, axis: int, identity: str, intensity) -> bool:
        """Whether the store holds this case and axis, complete, made from these voxels, backbone and intensity."""
        entry = self.read(dataset, case, axis)
        return entry is not None and entry.meta.get("key") == fingerprint_key(volume, axis, identity, intensity)

    def write(self, dataset: str, case: str, axis: int, slices: List[int], embeddings: np.ndarray,
              meta: Dict) -> None:
        folder = self.folder(dataset, case)
        q, scale = quantise(embeddings)
        for suffix, array in (("q", q), ("scale", scale)):
            with atomic_write(folder / f"axis{axis}.{suffix}.npy") as tmp:
                np.save(tmp, array)
        with atomic_write(folder / f"axis{axis}.json") as tmp:  # last: it marks the entry complete
            tmp.write_text(json.dumps({**meta, "slices": [int(t) for t in slices]}))


def encode_case(store: FeatureStore, dataset: str, name: str, volume, label: np.ndarray, axis: int, backbone,
                margin: int = MARGIN, modality: str = "auto", progress=None) -> FeatureEntry:
    """The store's entry for one case along one axis, encoding it first when it is missing or was made
    from other voxels, another backbone or another intensity range (its cache key differs)."""
    intensity = intensity_range(volume.array, modality)
    key = fingerprint_key(volume, axis, backbone.identity, intensity)
    entry = store.read(dataset, name, axis)
    if entry is not None and entry.meta.get("key") == key:
        return entry
    slices = training_slices(label, axis, margin)
    out = []
    with torch.inference_mode():
        for i, t in enumerate(slices):
            if progress is not None:
                progress.step("encode", i, len(slices))
            image = apply_range(get_slice(volume.array, axis, t), *intensity)
            out.append(backbone.encode(backbone.prepare([image])).float().cpu().numpy()[0])
    meta = {"intensity": list(intensity), "identity": backbone.identity, "shape": list(volume.shape),
            "key": key, "axis": axis}
    store.write(dataset, name, axis, slices, np.stack(out), meta)
    entry = store.entry(dataset, name, axis)
    entry.fresh = True  # encoded by this call
    return entry
