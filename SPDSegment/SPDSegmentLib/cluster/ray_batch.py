"""``spd batch --cluster``: the cases of a batch on Ray actors, each holding one loaded model.

The driver (this process) checks the output folder, starts one actor per GPU (or per
``cpus_per_worker`` CPU cores), hands each actor one case at a time and writes every row into the same
results CSV as the single-machine path (``core.batch.Results``). The actors run ``core.batch.Worker``:
the same skip rule, the same all-or-nothing outputs and sidecars, in the same output folder (on several
machines: a folder every node sees at the same path, as on a cluster's shared file system).

A worker process that dies (killed, out of memory) is restarted by Ray and its case retried, at most
``retries`` times; after that the case is one ``failed`` row and a fresh actor takes the worker's place.
A case that fails inside the worker (a corrupt file) is not retried: it would fail again.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

from ..core import batch
from ..core.errors import InputError, SPDError
from ..core.progress import Progress

# what the workers need from the driver's environment: the runtime and precision choice, the model cache
PASSED_ENV = ("SPDSEGMENT_RUNTIME", "SPDSEGMENT_PRECISION", "SPDSEGMENT_CACHE", "SPDSEGMENT_CACHE_MB")
LOCAL_OBJECT_STORE_BYTES = 128 << 20  # rows are small; the volumes never travel through Ray


class ClusterError(SPDError):
    """Ray is missing, the cluster cannot be reached, or no worker could be kept alive."""


@dataclasses.dataclass
class WorkerSpec:
    """How each actor loads its model: the same for all, sent once per actor."""
    model: str
    device: str = "auto"
    runtime: str = "auto"
    precision: str = "auto"
    settings: batch.Settings = dataclasses.field(default_factory=batch.Settings)
    threads: int = 1  # intra-op threads of the encoder (the CPU cores reserved for the actor)


class CaseActor:
    """A Ray actor: one loaded model (``batch.Worker``), one case at a time. A model that cannot be loaded
    is reported by :meth:`ready`, not raised, so the driver can say why in one line."""

    def __init__(self, spec: WorkerSpec):
        import torch  # the actor's own process: reserve its share of the cores

        torch.set_num_threads(max(1, int(spec.threads)))
        self.error = None
        try:
            self.worker = batch.Worker.load(spec.model, spec.device, spec.runtime, spec.precision, spec.settings)
        except SPDError as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> Optional[str]:
        return self.error

    def run(self, case: batch.Case, output_folder: str) -> dict:
        return self.worker.run(case, output_folder=output_folder)


def connect(address: str = "auto", num_cpus: Optional[int] = None, env: Optional[Dict[str, str]] = None):
    """Join a Ray cluster; returns (ray module, True when this call started a local cluster to stop later).

    ``address``: "auto" (a running cluster, from ``RAY_ADDRESS`` or this node's, else a local one),
    "local" (always a new local one, ``num_cpus`` cores, no dashboard, a small object store) or a
    cluster's address such as ``ray://head:10001`` or ``head:6379``.
    """
    try:
        import ray
    except ImportError:
        raise ClusterError("A cluster run needs Ray: pip install 'spdsegment[cluster]' (or pip install ray).",
                           setting="cluster") from None
    if ray.is_initialized():
        return ray, False
    common = dict(runtime_env={"env_vars": env or {}}, logging_level=logging.WARNING, log_to_driver=True)
    if address not in ("auto", "local"):
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ClusterError(f"Cannot reach the Ray cluster at {address} ({exc}). Start it (ray start --head) or "
                               "check the address.", setting="cluster") from None
        return ray, False
    if address == "auto":
        try:
            ray.init(address="auto", **common)
            return ray, False
        except (ConnectionError, ValueError, RuntimeError):
            pass  # no running cluster: start one here
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    return ray, True


def _worker_env(threads: int) -> Dict[str, str]:
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def plan_workers(resources: dict, device: str, workers: Optional[int], cpus_per_worker: int,
                 gpus_per_worker: Optional[float]) -> tuple:
    """(workers, cpus, gpus per worker) from the cluster's resources: one actor per GPU when it has GPUs
    and the device allows them, else one per ``cpus_per_worker`` cores; never more than fit on the cluster
    as it is (an actor that cannot be placed would wait for ever)."""
    gpus_total, cpus_total = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    cpus_per_worker = max(1, int(cpus_per_worker))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus_total >= 1 and device != "cpu" else 0.0
    fits = int(cpus_total // cpus_per_worker)  # more would wait for resources the cluster does not have
    if gpus_per_worker:
        fits = min(fits, int(gpus_total // gpus_per_worker))
    if fits < 1:
        raise ClusterError(f"The cluster has {cpus_total:g} CPUs and {gpus_total:g} GPUs: not enough for one worker "
                           f"of {cpus_per_worker} CPUs and {gpus_per_worker:g} GPUs.", setting="cluster")
    return min(int(workers), fits) if workers else fits, cpus_per_worker, float(gpus_per_worker)


def run(cases: Sequence[batch.Case], output_folder, spec: WorkerSpec, *, address: str = "auto",
        workers: Optional[int] = None, cpus_per_worker: int = 1, gpus_per_worker: Optional[float] = None,
        retries: int = 2, results_path=None, progress: Optional[Progress] = None,
        timings: Optional[dict] = None) -> List[dict]:
    """Run ``cases`` on a Ray cluster; rows as :func:`core.batch.run` returns them, in the cases' order.

    Args:
      cases: the batch (``core.batch.read_cases``, perhaps a shard of it).
      output_folder: the batch's output folder (seen by every node at the same path).
      spec: the model and settings each actor loads (``WorkerSpec``).
      address: "auto", "local" or a cluster address (:func:`connect`).
      workers: how many actors; None: one per GPU, else one per ``cpus_per_worker`` cores of the cluster.
      cpus_per_worker, gpus_per_worker: what each actor reserves (None GPUs: 1 when the cluster has GPUs).
      retries: how often a case whose worker died is tried again (on the restarted worker).
      results_path: the results CSV (default ``OUT/results.csv``).
      progress: gets ("batch", done, total); cancelling stops handing out cases.
      timings: a dict to fill with what Ray cost: ``start_s`` (joining or starting the cluster),
        ``ready_s`` (every worker's model loaded), ``in_ray_s`` (per case, the mean time from handing it out
        to its row beyond the worker's own ``seconds``: scheduling and transport).
    """
    timings = {} if timings is None else timings
    t_start = time.perf_counter()
    progress = progress or Progress()
    folder = batch.prepare_output_folder(output_folder).resolve()
    cases = [dataclasses.replace(c, image=os.path.abspath(c.image), points=os.path.abspath(c.points),
                                 output=os.path.abspath(c.output)) for c in cases]  # workers have their own cwd
    results = batch.Results(results_path or batch.default_results_path(folder), cases)
    spec = dataclasses.replace(spec, threads=cpus_per_worker)
    ray, started = connect(address, env=_worker_env(cpus_per_worker))
    timings["start_s"] = time.perf_counter() - t_start
    actors: List = []
    try:
        count, cpus, gpus = plan_workers(ray.cluster_resources(), spec.device, workers, cpus_per_worker,
                                         gpus_per_worker)
        remote = ray.remote(CaseActor).options(num_cpus=cpus, num_gpus=gpus, max_restarts=retries,
                                               max_task_retries=retries)
        start_actor = lambda: remote.remote(spec)  # noqa: E731
        actors = [start_actor() for _ in range(min(count, max(1, len(cases))))]
        _check_ready(ray, actors)
        timings["ready_s"] = time.perf_counter() - t_start
        beyond: List[float] = []  # per case: seconds in Ray beyond the worker's own
        replacements = len(actors) * (retries + 1)  # fresh actors for those that died too often, at most
        pending = collections.deque(cases)
        in_flight: Dict = {}  # object ref -> (actor, case)

        def hand_out(actor) -> None:
            if pending and not progress.cancelled:
                case = pending.popleft()
                in_flight[actor.run.remote(case, str(folder))] = (actor, case, time.perf_counter())

        for actor in actors:
            hand_out(actor)
        done = 0
        progress.step("batch", 0, len(cases))
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, case, handed_out = in_flight.pop(ready[0])
            try:
                row = ray.get(ready[0])
                beyond.append(time.perf_counter() - handed_out - float(row["seconds"]))
            except ray.exceptions.RayActorError as exc:
                row = _died_row(case, retries, exc)
                ray.kill(actor, no_restart=True)
                actors.remove(actor)
                if replacements <= 0:
                    raise ClusterError(f"Workers kept dying ({_first_line(exc)}); the results CSV says which cases "
                                       "finished. Check the workers' memory and logs.") from None
                replacements -= 1
                actor = start_actor()
                actors.append(actor)
            except ray.exceptions.RayError as exc:  # the task itself broke outside the case's own handling
                row = dict.fromkeys(batch.RESULT_COLUMNS, "")
                row.update(case=case.name, status="failed", output=case.output, error=_first_line(exc))
            results.add(row)
            done += 1
            progress.step("batch", done, len(cases))
            hand_out(actor)
        progress.check()
        timings["in_ray_s"] = sum(beyond) / len(beyond) if beyond else 0.0
    finally:
        results.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
    return [results.rows[c.name] for c in cases if c.name in results.rows]


def _check_ready(ray, actors) -> None:
    """Wait for every actor's model; a model that cannot be loaded is the driver's error, in one line."""
    for error in ray.get([actor.ready.remote() for actor in actors]):
        if error:
            raise InputError(f"The cluster workers could not load the model: {error}", setting="model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _died_row(case: batch.Case, retries: int, exc: BaseException) -> dict:
    row = dict.fromkeys(batch.RESULT_COLUMNS, "")
    row.update(case=case.name, status="failed", output=case.output,
               error=f"the worker died during this case, {retries + 1} times ({_first_line(exc)}); nothing was "
                     "written for it")
    return row
