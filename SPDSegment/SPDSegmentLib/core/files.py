"""Writing files so that a failure never leaves a partial one: write a temporary file, then rename."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path`` in one rename.

    If the block raises, the temporary file is removed and ``path`` is left as it was. The temporary
    name ends with the target's own name (writers that choose the format by extension, such as
    SimpleITK and ``np.save``, write the right one) and is unique per process and thread, so concurrent
    writers of the same file never share it. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
