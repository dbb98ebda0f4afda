"""The engine: the core behind every front end, and the loop that serves it in its own process.

:class:`Engine` loads each model once and keeps the embedding cache with its re-prompt memo hot;
``Engine.handle(request, progress)`` does one job (the request types of :mod:`.protocol`). The
console API and the benchmark call it in-process; the Slicer GUIs reach it through
:class:`Server`, which runs it in the child process ``python -m SPDSegmentLib.engine``: a reader
thread takes messages off the private pipe (cancel and status are answered at once, and any new
job supersedes work ahead that is still running), the main thread does one job at a time and sends
progress, then exactly one reply. Imports only ``core``.

The server survives whatever its parent sends once the parent has proved itself (the token): a line that is not
JSON, not an object, too long, without an id, of an unknown kind, or with values of the wrong type gets an
error reply, and the reader thread goes on (so the engine still stops when its stdin closes). Files are read
only from its private folder (``protocol.from_json`` with ``confine``).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

from ..core.errors import Cancelled, CheckpointError, InputError, SPDError
from ..core.models.registry import check_device
from ..core.progress import Progress
from . import protocol

log = logging.getLogger("spd.engine")


class DependencyError(SPDError):
    """A package the engine needs is not installed in this Python."""


class Engine:
    """Models loaded once per (name, device), one embedding cache; one job at a time per caller."""

    def __init__(self, cache=None):
        self._cache = cache
        self._models: Dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @property
    def cache(self):
        from ..core.cache import default_cache

        return self._cache if self._cache is not None else default_cache()

    # ------------------------------------------------------------ models
    def model(self, name: Optional[str] = None, device: str = "auto", allow_download: bool = False,
              progress: Optional[Progress] = None):
        """The loaded model (name, path, or None for the default SPD model); loads it on first use."""
        from ..core import pipeline

        if name is not None and not isinstance(name, (str, os.PathLike)):
            return name  # already loaded (the console API accepts a model object)
        device = check_device(device)  # before anything loads
        key = (str(name or pipeline.DEFAULT_MODEL), device)
        with self._lock:
            if key not in self._models:
                ensure_checkpoint(key[0], allow_download, progress)
                self._models[key] = pipeline.load_model(key[0], device=device)
            return self._models[key]

    def forget(self) -> None:
        """Drop every cached slice, saliency map and decoded mask (the volumes they came from are gone);
        the loaded models stay."""
        self.cache.clear()

    def loaded(self):
        return [{"model": name, "device": device, "runtime": _backbone(model).runtime_name}
                for (name, device), model in list(self._models.items())]

    # ------------------------------------------------------------ jobs
    def handle(self, request, progress: Optional[Progress] = None):
        """Do one job; raise SPDError (Cancelled, InputError, ...) for what the user can act on."""
        progress = progress or Progress()
        try:
            if isinstance(request, protocol.LoadModel):
                return model_info(self.model(request.model, request.device, request.allow_download, progress))
            if isinstance(request, protocol.EncodeAhead):
                return self._work_ahead(request, progress)
            if isinstance(request, protocol.Segment):
                return self._segment(request, progress)
            if isinstance(request, protocol.Batch):
                return self._batch(request, progress)
            if isinstance(request, protocol.Status):
                return self.status()
        except ImportError as exc:
            raise DependencyError(f"{exc}: a package SPD needs is missing from this Python. In Slicer, press "
                                  "'Install dependencies' in the SPD module.") from exc
        except MemoryError as exc:
            raise SPDError("Out of memory: close other data, choose fewer slices or a smaller model.") from exc
        raise InputError(f"Unknown request {type(request).__name__}.")

    def _segment(self, request: protocol.Segment, progress: Progress):
        """Run ``pipeline.segment``. Slices the work ahead had not encoded yet are encoded first, under the stage
        name ``protocol.CATCHING_UP_STAGE``, so the GUI can say that the engine is catching up."""
        from ..core import pipeline

        model = self.model(request.model, request.device, request.allow_download, progress)
        plan = pipeline.plan(request.volume, request.prompts, model, request.options or pipeline.SegmentOptions())
        reports = progress.callback
        if reports is not None and not all(self.cache.contains(plan.key, t) for t in plan.encode):
            progress.callback = lambda stage, done, total: reports(
                protocol.CATCHING_UP_STAGE if stage == "encode" else stage, done, total)
        try:
            result = pipeline.segment(request.volume, request.prompts, model, request.options, progress=progress,
                                      cache=self.cache)
        finally:
            progress.callback = reports
        progress.check()  # a cancel that arrives after the last slice still returns nothing
        return result

    def _work_ahead(self, request: protocol.EncodeAhead, progress: Progress):
        """Encode the slices the run needs, nearest the newest click first, then run it (its saliency
        maps and decoded slices are remembered), stopping at the next slice when superseded."""
        from ..core import pipeline

        model = self.model(request.model, request.device, False, progress)
        options = request.options or pipeline.SegmentOptions()
        plan = pipeline.plan(request.volume, request.prompts, model, options)
        cache = self.cache
        newest = int(request.prompts.slice_index()[-1])
        encoded = 0
        for t in sorted(plan.encode, key=lambda s: (abs(s - newest), s)):
            progress.check()
            if not cache.contains(plan.key, t):
                pipeline.encode_slices(plan.backbone, request.volume, plan.axis, [t], plan.intensity, cache=cache,
                                       progress=None, batch_size=1, key=plan.key)
                encoded += 1
        # no saliency volume: the maps are remembered per slice, and a volume-sized array per click
        # would only churn memory on a large CT
        pipeline.segment(request.volume, request.prompts, model,
                         dataclasses.replace(options, return_saliency=False), progress=progress, cache=cache)
        return {"encoded": encoded, "ran": True}

    def _batch(self, request: protocol.Batch, progress: Progress):
        model = self.model(request.model, request.device, False, progress)
        return run_batch(request.cases, request.output_folder, model, request.options, progress, request.axis)

    def status(self) -> dict:
        from ..core.models.download import cache_dir

        cache = self.cache
        settings = {k: v for k, v in os.environ.items()
                    if k.startswith("SPDSEGMENT_") and k not in (protocol.TOKEN_ENV, protocol.SHARE_ENV)}
        return {"pid": os.getpid(), "models": self.loaded(), "cache_items": len(cache),
                "cache_mb": round(getattr(cache, "_bytes", 0) / 2 ** 20, 1), "device": device_info(),
                "cache_folder": str(cache_dir()), "settings": settings}


def _backbone(model):
    return getattr(model, "backbone", model)


def model_info(model) -> dict:
    """What the GUIs show about a loaded model (an SPD model's own tau and n)."""
    backbone = _backbone(model)
    spd = hasattr(model, "head")
    return {"kind": "spd" if spd else "backbone", "backbone": backbone.name, "runtime": backbone.runtime_name,
            "device": str(backbone.device), "tau": model.tau if spd else None,
            "neighbours": model.neighbours if spd else None}


def ensure_checkpoint(name: str, allow_download: bool, progress: Optional[Progress] = None) -> None:
    """Download the backbone checkpoint ``name`` needs only when the user asked for it, with progress."""
    from ..core.models import registry

    backbone = name
    if name in registry.BUNDLED_SPD_MODELS or name.endswith(".safetensors"):
        from ..core import spd_model

        path = spd_model.resolve(name)
        if path is None or not Path(path).exists():
            return  # spd_model.load says what is missing
        backbone = spd_model.read_header(path).get("backbone", "")
    entry = registry.catalogue().get(backbone)
    if entry is None or entry["source"] != "url" or registry.is_available(backbone):
        return
    if not registry.downloadable(backbone):
        raise CheckpointError(registry.manual_download_message(backbone), setting="model")
    if not allow_download:
        size = f" ({entry['size_bytes'] / 1e6:.0f} MB)" if entry.get("size_bytes") else ""
        raise CheckpointError(f"The {backbone} checkpoint{size} is not on this machine. Download it first: SPD "
                              "module > Models and dependencies > Download selected model.")

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress.step("download (MB)", done >> 20, max(total, 1) >> 20)

    registry.checkpoint_for(backbone, allow_download=True, progress=report)


def device_info() -> str:
    """The device and engine a run will use (imports torch)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed: use 'Install dependencies'."
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return (f"CUDA: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free "
                f"(PyTorch {torch.__version__})")
    try:
        from ..core.models.openvino_runtime import openvino_module

        engine = f"OpenVINO {openvino_module().__version__.split('-')[0]}"
    except ImportError:
        engine = "no OpenVINO: 'Install dependencies' adds it, 2-3x faster on a CPU"
    return f"CPU (PyTorch {torch.__version__}; {engine}); a CUDA GPU makes runs several times faster."


def run_batch(cases, output_folder, model, options=None, progress: Optional[Progress] = None, axis=None):
    """The ``Batch`` request: ``core.batch.run`` with this engine's loaded model and a cache of its own (the
    effect's stays as it is). ``cases``: ``batch.Case`` objects or (name, image, points) tuples, written to
    ``OUT/NAME_spd.seg.nrrd``; one row per case (``batch.RESULT_COLUMNS``), failures in the rows, not raised;
    cases already done are skipped; ``OUT/results.csv`` holds the rows. Cancelling stops before the next case."""
    from ..core import batch

    worker = batch.Worker(model, batch.Settings(options=options, axis=axis))
    return batch.run(worker, batch.cases_from_tuples(cases, output_folder), output_folder, progress=progress)


# ---------------------------------------------------------------- the process

@dataclasses.dataclass
class _Job:
    id: int
    kind: str
    body: Any
    progress: Progress


class Server:
    """Serves one parent over a private pipe; see :mod:`.protocol` for the messages."""

    def __init__(self, engine: Engine, out_stream, share_folder, token: str):
        self.engine = engine
        self._out = out_stream
        self._out_lock = threading.Lock()
        self._share = share_folder
        self._token = token
        self._authorised = False
        self._jobs: "collections.deque[_Job]" = collections.deque()
        self._current: Optional[_Job] = None
        self._wake = threading.Condition()
        self._stopping = False
        self._volumes = protocol.VolumeRack(confine=share_folder)

    def send(self, message: dict) -> None:
        data = protocol.dumps(message)
        with self._out_lock:
            try:
                self._out.write(data)
                self._out.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.stop()  # the parent is gone

    # ------------------------------------------------------------ reader thread
    def read_from(self, stream) -> None:
        buffer = protocol.LineBuffer()
        while not self._stopping:
            data = stream.read(1 << 16)
            if not data:
                break
            for line in buffer.lines(data):
                self.take(line)
        log.info("the parent closed the pipe; stopping")
        self.stop()
        deadline = threading.Timer(15.0, os._exit, args=(0,))  # a job stuck in native code must not outlive Slicer
        deadline.daemon = True  # a normal stop does not wait for it
        deadline.start()

    def take(self, line: Optional[bytes]) -> None:
        """One line off the pipe (None: a line that was too long). Before the hello, anything unexpected means
        the pipe is not the parent's: the engine exits. After it, a bad message gets an error reply and the
        reader goes on."""
        try:
            message = protocol.loads(line) if line is not None else None
        except (ValueError, RecursionError):  # not JSON, not UTF-8, not an object with a type, nested too deep
            message = None
        if not self._authorised and message is None:
            log.error("a message that is not SPD protocol: the pipe is not ours; stopping")
            os._exit(3)
        if message is None:
            why = (f"longer than {protocol.MAX_LINE_BYTES} bytes" if line is None else
                   "not a JSON object with a type")
            self.refuse(None, f"The engine received a message {why}; it was ignored.")
            return
        try:
            self.receive(message)
        except Exception:  # noqa: BLE001 - the reader thread must survive any message
            log.error("message %.200r failed:\n%s", message, traceback.format_exc())
            self.refuse(_request_id(message), "The engine could not handle this message (details in its log).",
                        "EngineError")

    def refuse(self, request_id, text: str, error: str = "InputError") -> None:
        self.send({"type": "error", "id": request_id, "error": error, "message": text})

    def receive(self, message: dict) -> None:
        kind = message.get("type")
        if not self._authorised:
            if kind == "hello" and self._token and message.get("token") == self._token:
                self._authorised = True
                self.send({"type": "ready", "pid": os.getpid(), "protocol": protocol.PROTOCOL_VERSION})
                return
            log.error("refused: the first message did not carry this engine's token (only the process that "
                      "started the engine may use it)")
            os._exit(3)
        request_id = _request_id(message)
        if kind in ("request", "cancel") and request_id is None:
            self.refuse(None, f"A {kind} message needs an id (a number or a string); it was ignored.")
        elif kind == "cancel":
            self._cancel(request_id)
        elif kind == "shutdown":
            self.stop()
        elif kind == "forget":
            self._forget()
        elif kind == "request" and message.get("kind") == "status":
            self.send({"type": "result", "id": request_id, "body": self._status()})
        elif kind == "request" and isinstance(message.get("kind"), str) and message["kind"] in protocol.REQUESTS:
            self._enqueue(_Job(request_id, message["kind"], message.get("body"), Progress()))
        else:
            self.refuse(request_id, f"The engine does not understand {str(kind)[:80]!r} / "
                                    f"{str(message.get('kind'))[:80]!r}.")

    def _status(self) -> dict:
        status = self.engine.status()
        current = self._current
        status.update({"current": current.kind if current else None, "queued": len(self._jobs),
                       "volumes": len(self._volumes)})
        return status

    def _enqueue(self, job: _Job) -> None:
        with self._wake:
            current = self._current
            if current is not None and current.kind == "encode_ahead":
                current.progress.cancel()  # superseded by newer work
            superseded = [j for j in self._jobs if j.kind == "encode_ahead"]
            for old in superseded:
                self._jobs.remove(old)
                self.send({"type": "cancelled", "id": old.id})
            self._jobs.append(job)
            self._wake.notify()

    def _cancel(self, job_id) -> None:
        with self._wake:
            if self._current is not None and self._current.id == job_id:
                self._current.progress.cancel()
                return
            for job in list(self._jobs):
                if job.id == job_id:
                    self._jobs.remove(job)
                    self.send({"type": "cancelled", "id": job_id})

    def _forget(self) -> None:
        """The parent's scene was closed: stop its work, then (between jobs) drop its volumes and cache."""
        with self._wake:
            if self._current is not None:
                self._current.progress.cancel()
            for job in list(self._jobs):
                self.send({"type": "cancelled", "id": job.id})
            self._jobs.clear()
            self._jobs.append(_Job(None, "forget", None, Progress()))
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            if self._current is not None:
                self._current.progress.cancel()
            self._wake.notify_all()

    # ------------------------------------------------------------ main thread
    def serve(self) -> int:
        while True:
            with self._wake:
                while not self._jobs and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return 0
                job = self._current = self._jobs.popleft()
            try:
                self._run(job)
            finally:
                with self._wake:
                    self._current = None

    def _run(self, job: _Job) -> None:
        if job.kind == "forget":  # no reply: the parent has dropped its side already
            self._volumes.clear()
            self.engine.forget()
            log.info("the parent's scene was closed: volumes and cached slices dropped")
            return
        started = time.perf_counter()
        if job.kind != "encode_ahead":  # work ahead is quiet
            job.progress.callback = lambda stage, done, total: self.send(
                {"type": "progress", "id": job.id, "stage": stage, "done": int(done), "total": int(total)})
        try:
            request = self._request(job)
            value = self.engine.handle(request, job.progress)
            reply = {"type": "result", "id": job.id, "body": protocol.to_json(value, folder=self._share)}
        except Cancelled:
            reply = {"type": "cancelled", "id": job.id}
        except SPDError as exc:
            reply = {"type": "error", "id": job.id, "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, details in the log
            log.error("request %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())
            reply = {"type": "error", "id": job.id, "error": "EngineError",
                     "message": f"{type(exc).__name__}: {exc} (details in the engine log)"}
        log.info("request %s (%s): %s in %.3f s", job.id, job.kind, reply["type"], time.perf_counter() - started)
        self.send(reply)

    def _request(self, job: _Job):
        """The job's request, rebuilt from its body (files only from the private folder) and type-checked."""
        try:
            request = protocol.from_json(job.body, open_volume=self._volumes.open, confine=self._share)
        except InputError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
            raise InputError(f"The engine received a malformed {job.kind} request ({str(exc)[:200]}); nothing was "
                             "done.") from None
        expected = protocol.REQUESTS[job.kind]
        if type(request) is not expected:
            raise InputError(f"The body of a {job.kind} request is not a {expected.__name__}; nothing was done.")
        protocol.check_request(request)
        return request


def _request_id(message: dict):
    """A message's request id when it is a number or a string, else None."""
    value = message.get("id")
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def main() -> int:
    """``python -m SPDSegmentLib.engine``: serve the parent on this process's stdin and stdout."""
    import sys

    token = os.environ.pop(protocol.TOKEN_ENV, "")
    share = os.environ.get(protocol.SHARE_ENV, "")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not token or not share:
        log.error("this engine serves only the process that starts it (SPDSegmentLib.engine.client); "
                  "it is not meant to be started by hand")
        return 2
    # keep the pipes for the protocol; anything a library prints goes to the log instead
    requests_in = os.fdopen(os.dup(0), "rb", buffering=0)
    replies_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    server = Server(Engine(), replies_out, share, token)
    log.info("SPD engine %s started (Python %s)", os.getpid(), sys.version.split()[0])
    threading.Thread(target=server.read_from, args=(requests_in,), name="SPD engine pipe", daemon=True).start()
    return server.serve()
