"""The engine's processes and private folders: end a whole process tree, tell a live process from a dead
one, keep folders and logs private, and remove the folders that dead engines left behind.

Slicer's ``PythonSlicer`` is a launcher (commontk AppLauncher, ``ctkAppLauncher.cpp``): it starts the
real interpreter (``python-real``) as a child process and waits for it. Killing the launcher leaves the
interpreter running, so every kill here ends a tree: the launcher, the interpreter whose pid the engine
reports in its ``ready`` message, and every child of either. With psutil (a dependency of SPDSegment,
not shipped with Slicer) the tree is walked; without it, POSIX kills the launcher's process group (the
client starts the launcher as a group leader) and Windows asks ``taskkill /T``.

A process is known by its pid *and* start time (``identity``), so a pid that the system has since given
to another program is never taken for the engine: nothing is killed, and no folder removed, on a pid alone.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

try:
    import psutil
except ImportError:  # Slicer does not ship it; 'Install dependencies' adds it
    psutil = None

SHARE_PREFIX = "engine-"  # the engines' folders inside the share root
OWNER_FILE = "owners.json"  # who uses a share folder: [{"pid", "started"}, ...]
SAME_START_S = 0.5  # two start times this close are one process (psutil's are exact to the clock tick)


# ---------------------------------------------------------------- processes

def identity(pid: int) -> dict:
    """``{"pid", "started"}`` of a running process; ``started`` is None without psutil or once it is gone."""
    started = None
    if psutil is not None:
        try:
            started = psutil.Process(pid).create_time()
        except (psutil.Error, OSError):
            pass
    return {"pid": int(pid), "started": started}


def _process(who: dict):
    """The psutil process ``who`` names, None if it is gone or its pid now belongs to another program."""
    try:
        process = psutil.Process(int(who["pid"]))
        started = who.get("started")
        if started is not None and abs(process.create_time() - float(started)) > SAME_START_S:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except (psutil.Error, OSError, ValueError, TypeError, KeyError):
        return None


def is_alive(who: dict) -> bool:
    """Whether the process ``who`` (an :func:`identity`) still runs. Without psutil, a pid that exists
    counts as alive on POSIX, and every process does on Windows (it cannot be checked without signalling)."""
    if psutil is not None:
        return _process(who) is not None
    if os.name != "posix":
        return True
    try:
        os.kill(int(who["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError, KeyError):
        return True
    return True


def tree(roots: Iterable[dict]) -> List[dict]:
    """The identities of ``roots`` and of all their descendants now (only ``roots`` without psutil)."""
    found = {}
    for who in roots:
        if not who:
            continue
        found[who["pid"]] = who
        process = _process(who) if psutil is not None else None
        if process is None:
            continue
        try:
            for child in process.children(recursive=True):
                found[child.pid] = {"pid": child.pid, "started": child.create_time()}
        except psutil.Error:
            pass
    return list(found.values())


def kill_tree(roots: Iterable[dict], group: Optional[int] = None) -> int:
    """End the processes ``roots`` (identities) and all their descendants at once (SIGKILL, TerminateProcess).

    The descendants are collected before anything is killed (a killed launcher's child would otherwise be
    handed to another parent). ``group``: the launcher's process group, killed as a whole where psutil is
    missing (POSIX), or ``taskkill /T`` of that pid (Windows). Never waits; returns how many were signalled.
    """
    roots = [r for r in roots if r and r.get("pid")]
    if psutil is None:
        return _kill_without_psutil(roots, group)
    victims = {}
    for who in roots:
        process = _process(who)
        if process is None:
            continue
        try:
            family = [process] + process.children(recursive=True)
        except psutil.Error:
            family = [process]
        victims.update({p.pid: p for p in family})
    for process in victims.values():
        try:
            process.kill()
        except psutil.Error:
            pass
    return len(victims)


def _kill_without_psutil(roots: List[dict], group: Optional[int]) -> int:
    if os.name == "posix":
        if group:
            try:
                os.killpg(group, signal.SIGKILL)
                return 1
            except (ProcessLookupError, PermissionError):
                return 0
        return 0
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    pids = [group] if group else [r["pid"] for r in roots]
    for pid in pids:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, creationflags=flags,
                       timeout=5, check=False)
    return len(pids)


def new_group_options() -> dict:
    """``subprocess.Popen`` arguments that make the child lead its own process group (and, on Windows,
    open no console window), so that its whole tree can be ended even without psutil.

    On POSIX the child stays in the caller's session: Linux schedules each session as one group
    (autogroup), and an engine in a session of its own got a fraction of the CPU time it got in Slicer's
    when both cores were busy (a first Preview took 175 s against 32 s; docs/performance.md, "Correction
    latency"). A new session only where Python cannot make a process group without one (3.10)."""
    if os.name == "posix":
        return {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    return {"creationflags": flags}


# ---------------------------------------------------------------- pipes read without waiting

def never_block(stream) -> None:
    """Make reads of a child's output pipe return at once (POSIX; Windows peeks instead)."""
    if os.name != "nt":
        os.set_blocking(stream.fileno(), False)


def read_available(stream) -> Tuple[bytes, bool]:
    """(the bytes a child has written to ``stream`` so far, whether its end is closed); never waits.
    POSIX: ``stream`` was passed to :func:`never_block`; Windows: the pipe is peeked first."""
    fd = stream.fileno()
    if os.name == "nt":
        import ctypes  # Windows only
        import msvcrt

        available = ctypes.c_ulong(0)
        handle = msvcrt.get_osfhandle(fd)
        if not ctypes.windll.kernel32.PeekNamedPipe(handle, None, 0, None, ctypes.byref(available), None):
            return b"", True
        return (os.read(fd, available.value) if available.value else b""), False
    chunks: List[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks), False
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


# ---------------------------------------------------------------- private folders and files

def private_folder(path) -> Path:
    """``path`` as a folder only this user can open (0700): created so, or tightened when it is this
    user's; a link or another user's folder is refused (``PermissionError``)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a plain folder; SPD keeps its private files elsewhere.")
    if os.name == "posix":
        if info.st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to another user; SPD keeps its private files elsewhere.")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    return path


def open_private(path):
    """A new (or appended) binary file that only this user can read (0600, whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(path, flags, 0o600)
    if os.name == "posix":
        os.fchmod(descriptor, 0o600)  # an older file of the same name may have been wider
    return os.fdopen(descriptor, "ab")


def share_root() -> Path:
    """Where engines' folders live: a private folder of this user in the system's temporary folder."""
    suffix = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"spdsegment-{suffix}"


def new_share_folder(root=None) -> Path:
    """A fresh private folder for one engine client's arrays, owned by this process (recorded in it).

    The folders of dead engines found beside it are removed first (:func:`remove_dead_folders`). If the
    root cannot be made private (a link, another user's), a private folder of its own is used instead.
    """
    try:
        root = private_folder(root or share_root())
    except (PermissionError, OSError):
        root = Path(tempfile.mkdtemp(prefix="spdsegment-"))
    remove_dead_folders(root)
    folder = Path(tempfile.mkdtemp(prefix=SHARE_PREFIX, dir=root))  # 0700
    record_owners(folder, [identity(os.getpid())])
    return folder


def record_owners(folder, owners: List[dict]) -> None:
    """Write who uses ``folder`` (written whole, then renamed, so a reader never sees half of it)."""
    folder = Path(folder)
    partial = folder / f".{OWNER_FILE}.{os.getpid()}"
    partial.write_text(json.dumps([o for o in owners if o]), encoding="utf-8")
    os.replace(partial, folder / OWNER_FILE)


def owners_of(folder) -> Optional[List[dict]]:
    """The recorded owners of a share folder; None when it records none (then it is never removed)."""
    try:
        owners = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(owners, list) or not owners or not all(isinstance(o, dict) and "pid" in o for o in owners):
        return None
    return owners


def remove_dead_folders(root) -> List[Path]:
    """Remove the engine folders in ``root`` whose every recorded owner has ended; returns them.

    Only ``engine-*`` folders (not links) that record their owners are looked at; a folder with a live
    owner, or one that records none, is left alone, and nothing else in ``root`` is touched.
    """
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SHARE_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        owners = owners_of(entry.path)
        if owners is None or any(is_alive(o) for o in owners):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
