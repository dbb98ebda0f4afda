"""The parent's side of the engine: start it, talk to it without ever blocking, restart it after a crash.

``EngineClient.segment(...)`` (and ``encode_ahead``, ``load_model``, ``batch``, ``status``) sends a
request and returns a :class:`Handle` at once; the GUI polls ``handle.done`` from a ``qt.QTimer``
(each poll reads what the engine has written so far, without waiting, and writes a few milliseconds
of a new volume's voxels), shows ``handle.state()`` and finally takes ``handle.result()``, which
re-raises the engine's error (``InputError``, ``Cancelled``, :class:`EngineDied`, ...). No thread is
started in the parent.

The engine is ``python -m SPDSegmentLib.engine`` started with the Python given (Slicer's
``PythonSlicer``, a launcher whose child is the real interpreter), its stdin and stdout a pipe private
to this process, its stderr a private log file. A token in its environment must come back in the first
message, so nothing but this process can drive it. If it dies (killed, out of memory, a native crash)
every pending handle fails with one line naming the log, and the next request starts a fresh engine;
the volume files stay in this client's private folder, so the new engine maps them again.
``handle.cancel()`` ends a handle at once; an engine that has not given up the request
``hang_seconds`` later is killed. Stopping, killing and replacing an engine end its whole process
tree (the launcher, the interpreter that reported its pid, their children: :mod:`.processes`), and
stopping never blocks for more than about half a second.
"""
from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..core import errors
from ..core.batch import cases_from_tuples
from ..core.models.download import cache_dir
from . import processes, protocol

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding SPDSegmentLib
KEEP_LOGS = 10
STOP_GRACE_S = 0.35  # how long stop() lets the engine end by itself before it ends the tree
WRITE_BUDGET_S = 0.02  # main-thread time per poll spent writing a new volume's voxels


class EngineError(errors.SPDError):
    """The engine failed in a way the user cannot fix; its log has the details."""


class EngineDied(errors.SPDError):
    """The engine process ended while a request was pending."""


ERRORS = {cls.__name__: cls for cls in (errors.SPDError, errors.InputError, errors.CheckpointError,
                                         errors.RuntimeChoiceError, errors.DeviceError, errors.DownloadError,
                                         errors.Cancelled, EngineError)}


class Polled:
    """Work in another process that a GUI polls: :attr:`done` (each look reads what has come, without
    waiting), then :meth:`result`. Scripts, tests and benchmarks may :meth:`wait` instead."""

    done: bool

    def wait(self, timeout: Optional[float] = None, interval: float = 0.005) -> bool:
        """Block until done; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.done:
            if deadline is not None and time.perf_counter() > deadline:
                return False
            time.sleep(interval)
        return True


class Handle(Polled):
    """One request: poll :attr:`done`, show :meth:`state`, then take :meth:`result`."""

    def __init__(self, client: "EngineClient", request_id: int, kind: str):
        self._client = client
        self.id = request_id
        self.kind = kind
        self.started_at = time.perf_counter()
        self._state: Tuple[str, int, int] = ("starting the engine" if not client.ready else "queued", 0, 1)
        self._finished = False
        self._value: Any = None
        self._error: Optional[BaseException] = None

    @property
    def done(self) -> bool:
        if not self._finished:
            self._client.poll()
        return self._finished

    @property
    def waiting_for_volume(self) -> bool:
        """Whether the request has not left yet: its volume is still being written for the engine."""
        return not self._finished and self._client.waiting_for_volume(self)

    @property
    def cancelled(self) -> bool:
        return isinstance(self._error, errors.Cancelled)

    @property
    def error(self) -> Optional[BaseException]:
        """The error a finished request ended with (None while it runs or when it succeeded)."""
        return self._error

    def state(self) -> Tuple[str, int, int]:
        """(stage, done, total) of the latest progress message."""
        return self._state

    def result(self):
        """The engine's answer; re-raises its error here."""
        if not self._finished:
            raise RuntimeError("The request has not finished; poll `done` first.")
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        self._client.cancel(self)

    def _finish(self, value=None, error: Optional[BaseException] = None) -> None:
        if not self._finished:
            self._finished, self._value, self._error = True, value, error


class EngineClient:
    """One engine process for this process (start on first use; stop at exit).

    ``env``: the engine's environment, or a function that returns it (called at each start, so settings
    changed since the last start reach the next engine); None is this process's environment.
    ``log_folder``: where each engine's log goes (private, 0700; default the user cache's ``logs``).
    ``share_root``: where the private folders for shared arrays are made (default
    :func:`.processes.share_root`, a folder of this user in the system's temporary folder).
    ``hang_seconds``: how long a cancelled request may run on before the engine is killed.
    """

    def __init__(self, python: Optional[str] = None,
                 env: Union[Mapping[str, str], Callable[[], Mapping[str, str]], None] = None,
                 log_folder=None, hang_seconds: float = 20.0, share_root=None):
        self.python = python or sys.executable
        self._env = env
        self.log_folder = Path(log_folder) if log_folder else cache_dir() / "logs"
        self.hang_seconds = hang_seconds
        self.share_root = share_root
        self.log_path: Optional[Path] = None
        self.ready = False
        self.pid: Optional[int] = None  # the engine interpreter's own pid (from its ready message)
        self.launcher_pid: Optional[int] = None  # the process started here (PythonSlicer: the launcher)
        self.starts = 0
        self.last_death: Optional[str] = None
        self._process: Optional[subprocess.Popen] = None
        self._engine: Optional[dict] = None  # the interpreter's identity (pid, start time)
        self._log_handle = None
        self._share: Optional[Path] = None
        self._shelf: Optional[protocol.VolumeShelf] = None
        self._buffer = protocol.LineBuffer()
        self._pending: Dict[int, Handle] = {}
        self._outbox: List[Tuple[dict, List[dict], Optional[int]]] = []  # (message, volume refs, request id)
        self._abandoned: Dict[int, float] = {}  # cancelled here, not yet given up by the engine: id -> when
        self._next_id = 1
        self._registered_exit = False

    # ------------------------------------------------------------ lifetime
    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def share_folder(self) -> Optional[Path]:
        """This client's private folder for arrays (None until the first start, and after stop)."""
        return self._share

    def environment(self) -> Dict[str, str]:
        """The environment the next engine starts with (before the token and folders are added)."""
        env = self._env() if callable(self._env) else self._env
        return dict(env if env is not None else os.environ)

    def start(self) -> "EngineClient":
        """Start the engine unless it runs (returns at once; it loads in the background)."""
        if self.alive:
            return self
        if self._process is not None:
            self._died()
        if self._share is None:
            self._share = processes.new_share_folder(self.share_root)  # private; dead engines' folders go
            self._shelf = protocol.VolumeShelf(self._share)
        processes.private_folder(self.log_folder)
        self.starts += 1
        self.log_path = self.log_folder / f"engine-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.starts}.log"
        self._prune_logs()
        token = secrets.token_hex(16)
        env = self.environment()
        env.update({protocol.TOKEN_ENV: token, protocol.SHARE_ENV: str(self._share), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT)] + ([env["PYTHONPATH"]]
                                                                           if env.get("PYTHONPATH") else []))})
        self._log_handle = processes.open_private(self.log_path)
        self._process = subprocess.Popen([self.python, "-m", "SPDSegmentLib.engine"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log_handle, env=env,
                                         cwd=str(self._share), **processes.new_group_options())
        processes.never_block(self._process.stdout)
        self.ready, self.pid, self._engine = False, None, None
        self.launcher_pid = self._process.pid
        self._buffer = protocol.LineBuffer()
        self._write({"type": "hello", "token": token, "protocol": protocol.PROTOCOL_VERSION})
        if not self._registered_exit:
            atexit.register(self.stop)
            self._registered_exit = True
        return self

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop the engine and forget its volumes; pending handles are cancelled. Never blocks much longer
        than ``grace`` seconds: the engine is asked to stop (shutdown, then its pipe closes), and whatever
        of its process tree still runs after ``grace`` is killed."""
        process, self._process = self._process, None
        if process is not None:
            family = processes.tree([processes.identity(process.pid), self._engine])  # before anyone exits
            try:
                process.stdin.write(protocol.dumps({"type": "shutdown"}))
                process.stdin.close()
            except (OSError, ValueError):
                pass
            deadline = time.perf_counter() + grace
            while process.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.01)
            processes.kill_tree(family, group=process.pid)  # what still runs (a worker the engine started, ...)
            try:
                process.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
            if process.stdout is not None:
                process.stdout.close()
        self._fail_pending(errors.Cancelled("The SPD engine was stopped; nothing was written."))
        self._outbox = []
        self.ready = False
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._share is not None:
            if self._shelf is not None:
                self._shelf.clear()
            shutil.rmtree(self._share, ignore_errors=True)
            self._share, self._shelf = None, None

    def kill(self) -> None:
        """End the engine's process tree at once (as a crash would); the next poll reports it."""
        if self._process is not None:
            self._end_tree(self._process, wait=0.5)

    def _end_tree(self, process: subprocess.Popen, wait: float = 0.1) -> None:
        """Kill what still runs of ``process`` (the launcher) and the engine it started, with their children."""
        roots = [processes.identity(process.pid) if process.poll() is None else None, self._engine]
        processes.kill_tree(roots, group=process.pid)
        try:
            process.wait(wait)  # reaps the launcher; SIGKILL ends it within milliseconds
        except subprocess.TimeoutExpired:
            pass

    def forget_volumes(self) -> None:
        """The scene was closed: cancel pending requests, remove every shared volume file, and have the
        engine drop its volumes and the slices it cached from them."""
        for handle in list(self._pending.values()):
            self.cancel(handle)
        self._outbox = []
        if self._shelf is not None:
            self._shelf.clear()
        if self.alive:
            self._write({"type": "forget"})

    # ------------------------------------------------------------ requests
    def submit(self, request) -> Handle:
        self.poll()
        self.start()
        handle = Handle(self, self._next_id, protocol.KIND_OF[type(request)])
        self._next_id += 1
        volumes: List[dict] = []

        def share(volume) -> dict:
            volumes.append(self._shelf.reference(volume))
            return volumes[-1]

        body = protocol.to_json(request, folder=self._share, share_volume=share)
        self._pending[handle.id] = handle
        self._send({"type": "request", "id": handle.id, "kind": handle.kind, "body": body}, volumes, handle.id)
        return handle

    def segment(self, volume, prompts, model=None, options=None, device: str = "auto",
                allow_download: bool = False) -> Handle:
        return self.submit(protocol.Segment(volume, prompts, model, options, device, allow_download))

    def encode_ahead(self, volume, prompts, model=None, options=None, device: str = "auto") -> Handle:
        return self.submit(protocol.EncodeAhead(volume, prompts, model, options, device))

    def load_model(self, model=None, device: str = "auto", allow_download: bool = False) -> Handle:
        return self.submit(protocol.LoadModel(model, device, allow_download))

    def batch(self, cases, output_folder, model=None, options=None, device: str = "auto") -> Handle:
        cases = cases_from_tuples(cases, output_folder)  # core.batch.Case objects travel as they are
        return self.submit(protocol.Batch(cases, str(output_folder), model, options, device))

    def status(self) -> Handle:
        return self.submit(protocol.Status())

    def cancel(self, handle: Handle) -> None:
        """End ``handle`` now (Cancelled) and tell the engine to stop it at its next slice."""
        if handle._finished:
            return
        handle._finish(error=errors.Cancelled("Cancelled; the segmentation was left unchanged."))
        if self._pending.pop(handle.id, None) is None:
            return
        queued = [item for item in self._outbox if item[2] == handle.id]
        if queued:  # never sent: the engine has nothing to give up
            self._outbox.remove(queued[0])
        elif self.alive:
            self._abandoned[handle.id] = time.perf_counter()
            self._write({"type": "cancel", "id": handle.id})

    def waiting_for_volume(self, handle: Handle) -> bool:
        """Whether ``handle``'s request still waits for its volume to be written (not yet sent)."""
        return any(item[2] == handle.id for item in self._outbox)

    # ------------------------------------------------------------ sending
    def _send(self, message: dict, volumes: List[dict], request_id: Optional[int]) -> None:
        """Write ``message`` now, or queue it (in order) behind the volumes it needs."""
        if self._outbox or not all(self._shelf.complete(ref) for ref in volumes):
            self._outbox.append((message, volumes, request_id))
            self._pump()
        else:
            self._write(message)

    def share_volume(self, volume) -> None:
        """Start writing ``volume``'s voxels for the engine now (the polls go on writing them), so that the
        first request about it leaves sooner: the effect calls this when a source volume is chosen."""
        self.start()
        self._shelf.reference(volume)
        self._pump()

    def _pump(self) -> None:
        """Write a few milliseconds of pending voxels, then send the queued messages whose volumes are ready."""
        if self._shelf is None or not (self._outbox or self._shelf.pending_bytes):
            return
        self._shelf.write_some(WRITE_BUDGET_S)
        while self._outbox and all(self._shelf.complete(ref) for ref in self._outbox[0][1]):
            message, _, _ = self._outbox.pop(0)
            self._write(message)
        if self._outbox:
            total = max(self._shelf.total_bytes, 1)
            done = total - self._shelf.pending_bytes
            for _, _, request_id in self._outbox:
                handle = self._pending.get(request_id)
                if handle is not None:
                    handle._state = ("sharing the volume with the engine (MB)", done >> 20, total >> 20)

    # ------------------------------------------------------------ polling
    def poll(self) -> None:
        """Read what the engine has written (never waits); finish handles; notice a dead or hung engine."""
        process = self._process
        if process is None:
            return
        self._pump()
        data, closed = self._read_available()
        try:
            messages = self._buffer.feed(data) if data else []
        except ValueError:
            messages, closed = [], True
            self._note("a reply was not SPD protocol; the engine is restarted")
            self.kill()
        for message in messages:
            self._dispatch(message)
        if closed or process.poll() is not None:
            self._died()
            return
        now = time.perf_counter()
        hung = [i for i, when in self._abandoned.items() if now - when > self.hang_seconds]
        if hung:
            self._note(f"request {hung[0]} did not stop within {self.hang_seconds:.0f} s of its cancel; "
                       "the engine was killed")
            self.kill()
            self._died()

    def _dispatch(self, message: dict) -> None:
        kind, request_id = message.get("type"), message.get("id")
        if kind == "ready":
            self.ready = True
            self.pid = int(message.get("pid") or 0) or None
            self._engine = processes.identity(self.pid) if self.pid else None
            if self._share is not None:  # the engine shares this folder: it is not a dead one while either runs
                processes.record_owners(self._share, [processes.identity(os.getpid()), self._engine])
            return
        if kind != "progress":
            self._abandoned.pop(request_id, None)  # the engine has given the request up
        handle = self._pending.get(request_id)
        if kind == "progress":
            if handle is not None:
                handle._state = (message.get("stage", ""), int(message.get("done", 0)), int(message.get("total", 1)))
            return
        self._pending.pop(request_id, None)
        if kind == "result":
            try:
                value = protocol.from_json(message.get("body"))  # also removes the result files
            except (OSError, ValueError) as exc:
                value, error = None, EngineError(f"The engine's answer could not be read ({exc}).")
            else:
                error = None
            if handle is not None:
                handle._finish(value, error)
        elif handle is not None and kind == "cancelled":
            handle._finish(error=errors.Cancelled("Cancelled; the segmentation was left unchanged."))
        elif handle is not None and kind == "error":
            cls = ERRORS.get(message.get("error"), EngineError)
            text = message.get("message", "")
            if cls is EngineError and self.log_path is not None:
                text = f"{text} Log: {self.log_path}"
            handle._finish(error=cls(text))

    def _died(self) -> None:
        """The engine ended (or its launcher did): end what is left of its tree, fail what was pending."""
        process, self._process = self._process, None
        if process is None:
            return
        self._end_tree(process, wait=0.5)
        code = process.poll()
        if process.stdout is not None:
            process.stdout.close()
        self.ready = False
        self._abandoned.clear()
        self._outbox = []
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self.last_death = (f"The SPD engine stopped unexpectedly (exit code {code}); nothing was written. "
                           f"Log: {self.log_path}")
        self._fail_pending(EngineDied(self.last_death))

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for handle in pending.values():
            handle._finish(error=error)

    def _write(self, message: dict) -> None:
        try:
            self._process.stdin.write(protocol.dumps(message))
            self._process.stdin.flush()
        except (OSError, ValueError, AttributeError):  # a dead engine: the next poll reports it
            pass

    def _read_available(self) -> Tuple[bytes, bool]:
        """(bytes the engine has written so far, whether its end of the pipe is closed); never waits."""
        return processes.read_available(self._process.stdout)

    def _note(self, text: str) -> None:
        """A line in the engine's log written by the parent (why it killed the engine)."""
        if self._log_handle is not None:
            self._log_handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} PARENT {text}\n".encode())
            self._log_handle.flush()

    def _prune_logs(self) -> None:
        logs = sorted(self.log_folder.glob("engine-*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[:-KEEP_LOGS]:
            try:
                old.unlink()
            except OSError:
                pass
