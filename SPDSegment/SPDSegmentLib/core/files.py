"""Writing files so that a failure never leaves a partial one: write a temporary file, then rename.

:func:`atomic_write` writes one file; :class:`OutputSet` writes the outputs of one run, renamed onto
their names together only when every one was written (a failure removes them all).
:func:`check_writable` says before a run whether an output can be written at all.
"""
from __future__ import annotations

import os
import secrets
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

from .errors import InputError


def temporary_name(path: os.PathLike, kind: str = "partial") -> Path:
    """A hidden sibling of ``path`` ending with its name, so that writers choosing the format by extension
    (SimpleITK, ``np.save``) write the right one; unique per process and thread."""
    path = Path(path)
    return path.with_name(f".{kind}-{os.getpid()}-{threading.get_ident()}-{path.name}")


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
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class OutputSet:
    """The outputs of one run, committed together.

    ``with OutputSet() as outputs: write(outputs.add(path_a)); write(outputs.add(path_b))`` writes
    each file to a temporary name; leaving the block normally renames all of them onto their real
    names, an exception removes them all (and any file a failed rename would have replaced is
    restored). Either every output exists complete, or none was written.
    """

    def __init__(self):
        self._pending: List[Tuple[Path, Path]] = []  # (temporary, final)

    def add(self, path: os.PathLike) -> Path:
        """Register an output; returns the temporary path to write it to."""
        final = Path(path)
        if any(_same(final, other) for _, other in self._pending):
            raise InputError(f"{final} is given as two outputs of one run; give each output its own file name.")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(final, f"output-{secrets.token_hex(3)}")
        self._pending.append((tmp, final))
        return tmp

    @property
    def paths(self) -> List[Path]:
        return [final for _, final in self._pending]

    def commit(self) -> List[Path]:
        """Rename every temporary file onto its name; on a failure undo the renames done so far."""
        missing = [str(final) for tmp, final in self._pending if not tmp.is_file()]
        if missing:
            self.discard()
            raise InputError(f"Internal error: outputs {missing} were never written; nothing was written.")
        done: List[Tuple[Path, Path]] = []  # (final, backup or None)
        try:
            for tmp, final in self._pending:
                backup = None
                if final.exists() and not final.is_dir():
                    backup = temporary_name(final, "previous")
                    os.replace(final, backup)
                done.append((final, backup))
                os.replace(tmp, final)
        except OSError as exc:
            for final, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, final)
                elif final.exists() and not final.is_dir():
                    _remove(final)
            self.discard()
            raise InputError(f"Could not write {exc.filename or 'an output'} ({exc.strerror or exc}); "
                             "nothing was written.") from exc
        for _, backup in done:
            if backup is not None:
                _remove(backup)
        paths = self.paths
        self._pending = []
        return paths

    def discard(self) -> None:
        for tmp, _ in self._pending:
            _remove(tmp)
        self._pending = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False


def check_writable(path: os.PathLike, what: str = "output") -> None:
    """InputError unless ``path`` can be written: not a folder, and its folder exists and is writable or
    can be created. Checked before a run, so a long computation never ends in a permission error."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"The {what} {path} is a folder; give a file name.")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"Cannot write the {what} {path}: {existing} is a file, not a folder. Choose another "
                         "output path.")
    try:  # try it: permissions, read-only file systems, ACLs and pseudo file systems all show up here
        handle, probe = tempfile.mkstemp(prefix=".spd-write-check-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        why = (f"the folder {folder} is not writable" if existing == folder else
               f"the folder {folder} cannot be created in {existing}")
        raise InputError(f"Cannot write the {what} {path}: {why} ({exc.strerror or exc}). Choose a folder you can "
                         "write to; nothing was computed.") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"The {what} {path} exists and cannot be overwritten (no write permission).")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return str(a) == str(b)
