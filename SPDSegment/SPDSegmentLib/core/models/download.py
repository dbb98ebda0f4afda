"""Checkpoint files: per-user cache, SHA-256 verification, downloads with progress.

The cache lives outside the install tree (Slicer's install folder may be read-only); where, is
:func:`cache_dir`'s rule, the only one.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..errors import CheckpointError, DownloadError
from ..files import atomic_write


CACHE_ENV = "SPDSEGMENT_CACHE"  # the user's choice of cache folder
HOST_CACHE_ENV = "SPDSEGMENT_HOST_CACHE"  # the cache folder of the application SPD runs in (Slicer's), set by it


def cache_dir() -> Path:
    """Where SPD keeps downloads, converted models, the training feature store and engine logs:
    ``$SPDSEGMENT_CACHE``; else, inside an application with a cache folder of its own (Slicer: Application
    Settings > Cache; the Slicer side puts it in ``$SPDSEGMENT_HOST_CACHE``), its ``SPDSegment`` subfolder;
    else ``~/.cache/spdsegment``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get(HOST_CACHE_ENV):
        return Path(os.environ[HOST_CACHE_ENV]) / "SPDSegment"
    return Path(os.path.expanduser("~")) / ".cache" / "spdsegment"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, sha256: Optional[str], size_bytes: Optional[int] = None, what: str = "checkpoint") -> None:
    """Raise CheckpointError unless ``path`` has the expected size and SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The {what} file {path} does not exist.")
    if size_bytes is not None and path.stat().st_size != size_bytes:
        raise CheckpointError(
            f"The {what} {path} has {path.stat().st_size} bytes, expected {size_bytes}: it is truncated or a "
            "different file. Delete it and download or reinstall it."
        )
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            raise CheckpointError(
                f"The {what} {path} is corrupt or a different file (SHA-256 {actual[:12]}..., expected "
                f"{sha256[:12]}...). Delete it and download or reinstall it."
            )


def download(url: str, destination: Path, sha256: Optional[str], size_bytes: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None, timeout: float = 30.0,
             allow_unverified: bool = False) -> Path:
    """Download ``url`` to ``destination`` (atomically) and verify its checksum.

    A file without a published checksum is refused unless ``allow_unverified`` is set.
    """
    destination = Path(destination)
    if destination.exists():
        verify(destination, sha256, size_bytes)
        return destination
    if sha256 is None and not allow_unverified:
        raise DownloadError(
            f"No SHA-256 is recorded for {url}, so it is not downloaded (it could not be checked). Download it "
            "yourself, check it with its publisher, and give the file's path as the model.", setting="model"
        )
    try:
        with atomic_write(destination) as partial:
            request = urllib.request.Request(url, headers={"User-Agent": "SPDSegment"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or size_bytes or 0)
                done = 0
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
            try:
                verify(partial, sha256, size_bytes, what=f"download of {url}")
            except CheckpointError as exc:  # a bad download is a download problem; the file is already discarded
                raise DownloadError(
                    f"The file downloaded from {url} is incomplete or not the expected one (its size or SHA-256 "
                    f"differs from {sha256}); it was discarded. Try again, or download it elsewhere, check it and "
                    "give its path as the model.", setting="model"
                ) from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DownloadError(
            f"Could not download {url} ({exc}). Check the network connection or proxy, or download the file "
            f"elsewhere and give its path as the model (expected SHA-256 {sha256}).", setting="model"
        ) from exc
    return destination
