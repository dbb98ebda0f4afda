"""Embedding cache: prompting the same volume again does not re-encode.

Keyed by (volume content fingerprint, slicing axis, backbone identity incl. LoRA, intensity range)
and slice index. In memory with an LRU bound in bytes; optionally mirrored on disk (float16 .npy)
so training and benchmarks encode each slice once across runs.

The same LRU also remembers per-slice results derived from an embedding (saliency maps, decoded
masks for a given prompt), memory only, so that re-prompting recomputes only the slices whose
prompts changed (``remember``/``recall``; keys built by ``pipeline``).

:func:`cache_folder` is where the on-disk caches live (converted OpenVINO models, the feature store): a
folder of the user cache, or, when that cannot be written (read-only, a file in the way), a private
temporary one with a warning, so that a broken cache never stops a run.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .errors import InputError, SPDWarning
from .files import atomic_write, check_folder_writable


class EmbeddingCache:
    def __init__(self, max_bytes: int = 1 << 30, directory: Optional[os.PathLike] = None):
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory else None
        self._items: "OrderedDict[tuple, object]" = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.RLock()  # the GUI encodes ahead in one thread while a run reads in another

    @staticmethod
    def _nbytes(item) -> int:
        if isinstance(item, np.ndarray):
            return int(item.nbytes)
        return item.element_size() * item.nelement()

    def _file(self, key: str, t: int) -> Optional[Path]:
        if self.directory is None:
            return None
        digest = hashlib.sha1(key.encode()).hexdigest()[:20]
        return self.directory / digest / f"{t:05d}.npy"

    def get(self, key: str, t: int):
        with self._lock:
            return self._get(key, t)

    def _get(self, key: str, t: int):
        item = self._items.get((key, t))
        if item is not None:
            self._items.move_to_end((key, t))
            self.hits += 1
            return item
        path = self._file(key, t)
        if path is not None and path.exists():
            import torch  # here, not at the top: the GUI imports this module at Slicer's start-up

            tensor = torch.from_numpy(np.load(path).astype(np.float32))
            self._store(key, t, tensor)
            self.hits += 1
            return tensor
        self.misses += 1
        return None

    def put(self, key: str, t: int, tensor) -> None:
        tensor = tensor.detach().to("cpu", copy=True)
        with self._lock:
            self._store(key, t, tensor)
        path = self._file(key, t)
        if path is not None and not path.exists():
            with atomic_write(path) as tmp:
                np.save(tmp, tensor.numpy().astype(np.float16))

    def remember(self, key: str, t: int, value) -> None:
        """Keep a derived result in memory only (never on disk)."""
        with self._lock:
            self._store(key, t, value)

    def recall(self, key: str, t: int):
        with self._lock:
            item = self._items.get((key, t))
            if item is not None:
                self._items.move_to_end((key, t))
            return item

    def _store(self, key: str, t: int, tensor) -> None:
        if (key, t) in self._items:
            self._bytes -= self._nbytes(self._items.pop((key, t)))
        self._items[(key, t)] = tensor
        self._bytes += self._nbytes(tensor)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._nbytes(old)

    def contains(self, key: str, t: int) -> bool:
        """In memory or on disk, without loading it."""
        with self._lock:
            if (key, t) in self._items:
                return True
        path = self._file(key, t)
        return path is not None and path.exists()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


_default: Optional[EmbeddingCache] = None


def default_cache() -> EmbeddingCache:
    """The process-wide cache shared by the CLI, the Slicer effect and the console API."""
    global _default
    if _default is None:
        _default = EmbeddingCache(max_bytes=int(os.environ.get("SPDSEGMENT_CACHE_MB", "1024")) << 20)
    return _default


_folders: Dict[Path, Path] = {}  # wanted cache folder -> the folder used (itself, or a temporary stand-in)
_folders_lock = threading.Lock()


def cache_folder(name: str) -> Path:
    """``cache_dir()/name`` (the user cache: ``$SPDSEGMENT_CACHE`` or ``~/.cache/spdsegment``), created. When it
    cannot be written (a read-only folder, a file in the way, a full disk), a private temporary folder (0700,
    removed at exit) stands in for this process, with an :class:`errors.SPDWarning` saying what to fix."""
    from .models.download import cache_dir

    wanted = cache_dir() / name
    with _folders_lock:
        if wanted not in _folders:
            try:
                check_folder_writable(wanted, what="cache folder")
                wanted.mkdir(parents=True, exist_ok=True)
                _folders[wanted] = wanted
            except (InputError, OSError) as exc:
                stand_in = Path(tempfile.mkdtemp(prefix=f"spdsegment-{name}-"))
                atexit.register(shutil.rmtree, stand_in, ignore_errors=True)
                warnings.warn(SPDWarning(
                    f"The cache folder {wanted} cannot be used ({str(exc).split(' Choose')[0].rstrip('.')}); this run "
                    f"uses the temporary folder {stand_in} instead, so what it caches is lost at exit. Make the folder "
                    "writable, or set SPDSEGMENT_CACHE to a folder you can write."), stacklevel=2)
                _folders[wanted] = stand_in
        return _folders[wanted]
