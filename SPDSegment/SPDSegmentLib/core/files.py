"""Writing files so that a failure never leaves a partial one, and success is never reported over a lost file.

:func:`atomic_write` writes one file; :class:`OutputSet` writes the outputs of one run, renamed onto
their names together only when every one was written (a failure removes them all). Every output is

1. written to a temporary file in its own folder (a rename within one folder is atomic);
2. flushed to the disk (``fsync``: a full disk that the write did not report shows up here), and
   checked: not empty, and read back by a verifier (one given by the writer, which knows the content,
   e.g. a digest of the mask; else the one registered for its kind: images, JSON, ``.npy``, model files).
   SimpleITK's writers do not report short writes; the read-back does;
3. renamed onto its name, and the folder synced where the operating system allows it.

A write that fails (a full disk: ENOSPC, a file-size limit: EFBIG, a quota) or a read-back that does
not match raises :class:`errors.InputError` from :func:`output_failure` (the one "disk full" message:
the file, the folder, its free space, what to do) and leaves every earlier file as it was.

Before a run: :func:`check_writable` (the folder can be written), :func:`check_space` (enough free space
for what the run will write) and :func:`check_not_inputs` (no output is one of the inputs, by name,
symlink or hard link).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from .errors import InputError

Verifier = Callable[[Path], None]  # raises IncompleteOutput(why) unless the file at the path is whole


class IncompleteOutput(Exception):
    """A written file that reads back wrong (raised by verifiers; reported through :func:`output_failure`)."""


# the temporaries of open OutputSets: their stat signature once atomic_write has sealed one (None until then),
# and the name each is to have (messages speak of that)
_sealed: Dict[str, Optional[tuple]] = {}
_final_of: Dict[str, Path] = {}
_sealed_lock = threading.Lock()


# ---------------------------------------------------------------- verifiers by kind

_VERIFIERS: Dict[str, Verifier] = {}  # file name ending (lower case) -> verifier


def register_verifier(suffixes: Iterable[str], verifier: Verifier) -> None:
    """Let every output whose name ends with one of ``suffixes`` be read back by ``verifier`` when its writer
    gave none (the module that writes a kind registers its check: volume for images, spd_model for models)."""
    for suffix in suffixes:
        _VERIFIERS[suffix.lower()] = verifier


def verifier_for(path: os.PathLike) -> Optional[Verifier]:
    """The registered verifier of the longest matching name ending, or None."""
    name = Path(path).name.lower()
    matches = [suffix for suffix in _VERIFIERS if name.endswith(suffix)]
    return _VERIFIERS[max(matches, key=len)] if matches else None


def verify_json(path: Path) -> None:
    try:
        json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IncompleteOutput(f"it is not complete JSON ({exc})") from None


def verify_npy(path: Path) -> None:
    """The header of a ``.npy`` file parses and the file holds every byte it announces."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as handle:
            version = fmt.read_magic(handle)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise IncompleteOutput(f"its array header is damaged ({exc})") from None
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) != expected:
        raise IncompleteOutput(f"it holds {os.path.getsize(path)} bytes, its header announces {expected}")


def verify_png(path: Path) -> None:
    """A PNG is whole: its signature, and the IEND chunk that closes every PNG."""
    with open(path, "rb") as handle:
        start = handle.read(8)
        handle.seek(max(os.path.getsize(path) - 8, 0))
        end = handle.read(8)
    if start != b"\x89PNG\r\n\x1a\n" or end != b"IEND\xaeB`\x82":
        raise IncompleteOutput("the PNG is cut short")


register_verifier([".json"], verify_json)  # .mrk.json, feature-store entries, reports
register_verifier([".npy"], verify_npy)  # caches, feature store, the engine's arrays
register_verifier([".png"], verify_png)  # the demo's overlay, the benchmark's plot


# ---------------------------------------------------------------- the "disk full" message

def free_bytes(folder: os.PathLike) -> Optional[int]:
    """Free bytes on the disk holding ``folder`` (its nearest existing parent), or None if unknown."""
    try:
        return shutil.disk_usage(_existing_parent(Path(folder))).free
    except OSError:
        return None


def format_bytes(count: Optional[float]) -> str:
    if count is None:
        return "an unknown amount"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than this system or process "
                "allows (a file-size limit)", getattr(errno, "EDQUOT", -1): "the disk quota is exceeded"}


def is_disk_full(exc: BaseException) -> bool:
    """A full disk, a file-size limit or an exceeded quota."""
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRORS


def output_failure(path: os.PathLike, why) -> InputError:
    """The one error for an output that could not be written whole: ``why`` is an OSError or a reason. It
    names the output (an OutputSet's temporary by the name it was to have) and the disk's free space."""
    path = Path(path)
    with _sealed_lock:
        path = _final_of.get(str(path), path)
    folder = Path(os.path.abspath(path.parent))
    if isinstance(why, OSError):
        reason = _DISK_ERRORS.get(why.errno) or why.strerror or str(why)
        disk = why.errno in _DISK_ERRORS
    else:
        reason, disk = str(why), True  # e.g. a short write that the writer did not report
    if not disk:
        return InputError(f"Could not write {path} ({reason}); nothing was written.")
    return InputError(f"Could not write {path}: {reason}. The disk holding {folder} has "
                      f"{format_bytes(free_bytes(folder))} free. Free some space or choose another folder; "
                      "nothing was written.")


def check_space(needs: Mapping[os.PathLike, int], what: str = "the outputs") -> None:
    """InputError if a folder's disk clearly lacks the bytes a run will write there; ``needs`` maps folders to
    bytes (folders on one disk are added up). Checked before the long work."""
    by_disk: Dict[int, Tuple[Path, int]] = {}
    for folder, count in needs.items():
        folder = _existing_parent(Path(folder))
        try:
            device = os.stat(folder).st_dev
        except OSError:
            continue
        first, total = by_disk.get(device, (folder, 0))
        by_disk[device] = (first, total + int(count))
    for folder, count in by_disk.values():
        free = free_bytes(folder)
        if free is not None and free < count:
            raise InputError(f"{what[0].upper() + what[1:]} need about {format_bytes(count)}, but the disk holding "
                             f"{folder} has {format_bytes(free)} free. Free some space or choose another folder; "
                             "nothing was computed.")


def least_output_bytes(kind: str, voxels: int) -> int:
    """A low estimate of an output's size (compressed) for an image of ``voxels``: a disk with less free space
    surely cannot hold it. ``kind``: ``saliency``, ``audit``, or any other for a mask (segmentation or label map)."""
    return 4096 + (voxels // 4 if kind == "saliency" else 0 if kind == "audit" else voxels // 500)


# ---------------------------------------------------------------- writing

def temporary_name(path: os.PathLike, kind: str = "partial") -> Path:
    """A hidden sibling of ``path`` ending with its name, so that writers choosing the format by extension
    (SimpleITK, ``np.save``) write the right one; unique per process and thread."""
    path = Path(path)
    return path.with_name(f".{kind}-{os.getpid()}-{threading.get_ident()}-{path.name}")


def _sync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows flushes only writable handles
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not possible on every system (Windows), then skipped."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def seal(tmp: Path, final: Path, verify: Optional[Verifier] = None) -> None:
    """Flush ``tmp`` to the disk and check it (not empty, ``verify`` or its kind's verifier); InputError from
    :func:`output_failure` (naming ``final``) when it is not whole."""
    try:
        _sync_file(tmp)
        if os.path.getsize(tmp) == 0:
            raise IncompleteOutput("it is empty")
        check = verify or verifier_for(final)
        if check is not None:
            check(tmp)
    except OSError as exc:
        raise output_failure(final, exc) from exc
    except IncompleteOutput as exc:
        raise output_failure(final, f"it read back incomplete ({exc})") from None


def _signature(path: Path) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@contextmanager
def atomic_write(path: os.PathLike, verify: Optional[Verifier] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds the file is sealed (flushed to the
    disk, checked: not empty, then ``verify(tmp)``, or the verifier registered for its kind) and replaces
    ``path`` in one rename.

    If the block raises or the check fails, the temporary file is removed and ``path`` is left as it was.
    A full disk or a file-size limit (ENOSPC, EFBIG, EDQUOT) becomes the InputError of :func:`output_failure`.
    The temporary name ends with the target's own name (writers that choose the format by extension,
    such as SimpleITK and ``np.save``, write the right one) and is unique per process and thread, so
    concurrent writers of the same file never share it. Parent folders are created.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
        except OSError as exc:
            if is_disk_full(exc):
                raise output_failure(path, exc) from exc
            raise  # e.g. a download's network error: its caller says what happened
        seal(tmp, path, verify)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise output_failure(path, exc) from exc
        _sync_folder(path.parent)
        with _sealed_lock:
            if str(path) in _sealed:  # an OutputSet's temporary: its commit need not read it back again
                _sealed[str(path)] = _signature(path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class OutputSet:
    """The outputs of one run, committed together.

    ``with OutputSet() as outputs: write(outputs.add(path_a)); write(outputs.add(path_b))`` writes
    each file to a temporary name; leaving the block normally seals every one (flushed, checked as
    :func:`atomic_write` does; a file its writer already sealed through ``atomic_write`` is not read
    again) and then renames all of them onto their real names; an exception, or a file that is not
    whole, removes them all (and any file a failed rename would have replaced is restored). Either every
    output exists complete, or none was written and the files they would have replaced are unchanged.
    """

    def __init__(self):
        self._pending: List[Tuple[Path, Path, Optional[Verifier]]] = []  # (temporary, final, verifier)

    def add(self, path: os.PathLike, verify: Optional[Verifier] = None) -> Path:
        """Register an output; returns the temporary path to write it to. ``verify(tmp)`` (optional) checks
        the written file, raising :class:`IncompleteOutput`; by default the verifier of its kind does."""
        final = Path(path)
        if any(same_file(final, other) for _, other, _ in self._pending):
            raise InputError(f"{final} is given as two outputs of one run; give each output its own file name.")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_failure(final, exc) from exc
        tmp = temporary_name(final, f"output-{secrets.token_hex(3)}")
        with _sealed_lock:
            _sealed[str(tmp)] = None
            _final_of[str(tmp)] = final
        self._pending.append((tmp, final, verify))
        return tmp

    @property
    def paths(self) -> List[Path]:
        return [final for _, final, _ in self._pending]

    def commit(self) -> List[Path]:
        """Seal every temporary file, then rename each onto its name; on a failure undo the renames done so far."""
        missing = [str(final) for tmp, final, _ in self._pending if not tmp.is_file()]
        if missing:
            self.discard()
            raise InputError(f"Internal error: outputs {missing} were never written; nothing was written.")
        try:
            for tmp, final, verify in self._pending:
                with _sealed_lock:
                    sealed = _sealed.get(str(tmp))
                if sealed is None or sealed != _signature(tmp):
                    seal(tmp, final, verify)
        except InputError:
            self.discard()
            raise
        done: List[Tuple[Path, Optional[Path]]] = []  # (final, backup or None)
        current = None
        try:
            for tmp, final, _ in self._pending:
                current = final
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
            raise output_failure(current, exc) from exc
        for _, backup in done:
            if backup is not None:
                _remove(backup)
        for folder in {final.parent for _, final, _ in self._pending}:
            _sync_folder(folder)
        paths = self.paths
        self._forget()
        return paths

    def discard(self) -> None:
        for tmp, _, _ in self._pending:
            _remove(tmp)
        self._forget()

    def _forget(self) -> None:
        with _sealed_lock:
            for tmp, _, _ in self._pending:
                _sealed.pop(str(tmp), None)
                _final_of.pop(str(tmp), None)
        self._pending = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None:
            self.commit()
            return False
        failed = self.paths[-1] if self.paths else Path("an output")  # the newest output was being written
        self.discard()
        if is_disk_full(value):  # a writer that wrote its temporary file directly (a CSV, a plot)
            raise output_failure(failed, value) from value
        return False


# ---------------------------------------------------------------- checks before a run

def check_writable(path: os.PathLike, what: str = "output") -> None:
    """InputError unless ``path`` can be written: not a folder, and its folder exists and is writable or
    can be created. Checked before a run, so a long computation never ends in a permission error."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"The {what} {path} is a folder; give a file name.")
    _check_folder(path.parent, f"the {what} {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"The {what} {path} exists and cannot be overwritten (no write permission).")


def check_folder_writable(folder: os.PathLike, what: str = "output folder") -> None:
    """InputError unless ``folder`` is a folder that can be written, or can be created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"The {what} {folder} is a file, not a folder; choose a folder. Nothing was computed.")
    _check_folder(folder, f"the {what} {folder}")


def _check_folder(folder: Path, target: str) -> None:
    existing = _existing_parent(folder)
    if not existing.is_dir():
        raise InputError(f"Cannot write {target}: {existing} is a file, not a folder. Choose another output path.")
    try:  # try it: permissions, read-only file systems, ACLs and pseudo file systems all show up here
        handle, probe = tempfile.mkstemp(prefix=".spd-write-check-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        why = (f"the folder {folder} is not writable" if existing == folder else
               f"the folder {folder} cannot be created in {existing}")
        raise InputError(f"Cannot write {target}: {why} ({exc.strerror or exc}). Choose a folder you can write to; "
                         "nothing was computed.") from None


def file_identity(path: os.PathLike) -> tuple:
    """What makes two names one file: (device, inode) of an existing file (symlinks followed, hard links
    equal), else its resolved absolute path."""
    try:
        st = os.stat(path)
        return ("file", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))


def same_file(a: os.PathLike, b: os.PathLike) -> bool:
    return file_identity(a) == file_identity(b)


def check_not_inputs(outputs: Mapping[str, os.PathLike], inputs: Iterable[os.PathLike]) -> None:
    """InputError if an output is one of the inputs: the same name, a symlink to it, or a hard link of it.

    ``outputs`` maps how the front end calls each output (e.g. "--out") to its path; ``inputs`` are the files
    the command reads (a folder stands for the files directly in it, as a DICOM series). Checked before the
    work, by every command that writes.
    """
    known: Dict[tuple, Path] = {}
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        members = [item]
        if item.is_dir():
            try:
                members = [Path(entry.path) for entry in os.scandir(item) if entry.is_file()]
            except OSError:
                members = []
        for member in members:
            known.setdefault(file_identity(member), member)
    for name, output in outputs.items():
        if output is None:
            continue
        clash = known.get(file_identity(output))
        if clash is not None:
            same = "" if os.path.abspath(clash) == os.path.abspath(output) else f" (it is {clash}, by a link)"
            raise InputError(f"The {name} {output} is an input of this command{same}; writing it would destroy the "
                             "input. Choose another output name; nothing was written.")


def _existing_parent(folder: Path) -> Path:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing
