"""The main thread's longest stall when a large volume first goes to the SPD engine (issue 20, part 3).

What the Segment Editor effect does on Slicer's main thread, on real MRML (``slicer-core``): read the
source volume node (``adapter.volume_from_node``), turn the clicks into voxel prompts, send the engine an
``EncodeAhead`` request, then poll the engine client every 50 ms (the effect's QTimer) until the request
has gone out. Every one of those calls runs on the main thread; the longest is the stall a user would feel
(a frozen GUI), the sum is how long the first request took to leave.

    python scripts/stall_check.py [--shape 600 512 512] [--dtype int16] [--repeats 3]

The engine is a real child process; the request names a model that does not exist, so the engine reads
the volume and answers at once with an error, and does not compete for the CPU while the main thread is
timed. Prints one JSON line per repeat and a summary (the worst of the repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SPDSegment"))

from SPDSegmentLib.core import prompts  # noqa: E402
from SPDSegmentLib.engine.client import EngineClient  # noqa: E402
from SPDSegmentLib.slicer_side import adapter  # noqa: E402

TICK_S = 0.05  # the effect's QTimer interval


def ct_like_volume_node(scene, shape, dtype):
    """A scalar volume node of ``shape`` (k, j, i) holding CT-like noise (HU -1000..2000)."""
    import vtk
    from vtk.util import numpy_support

    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 2000, size=shape, dtype=np.int32).astype(dtype)
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    del array
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    node.SetSpacing(0.7, 0.7, 1.0)
    node.SetAndObserveImageData(image)
    return node


def request_sent(handle) -> bool:
    """Whether the request has left for the engine (a client without an outbox sends at once)."""
    return not getattr(handle, "waiting_for_volume", False)


def one_round(client, node):
    calls = []

    def timed(label, function, *args):
        started = time.perf_counter()
        value = function(*args)
        calls.append((label, time.perf_counter() - started))
        return value

    volume = timed("volume_from_node", adapter.volume_from_node, node)
    ijk = np.array([[256.0, 256.0, k] for k in range(280, 320, 4)])
    clicks = timed("prompts", lambda: prompts.to_voxels(prompts.from_ijk(ijk), volume, axis=0))
    handle = timed("submit", client.encode_ahead, volume, clicks, "no-such-model", None, "cpu")
    while not request_sent(handle):
        time.sleep(TICK_S)
        timed("poll", client.poll)
    worst = max(calls, key=lambda c: c[1])
    handle.wait(60)  # the engine's answer (an unknown model), so the next round starts clean
    return {"longest_s": round(worst[1], 4), "longest_call": worst[0],
            "main_thread_s": round(sum(s for _, s in calls), 4), "calls": len(calls),
            "first_request_after_s": round(sum(s for _, s in calls) + TICK_S * (len(calls) - 3), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[600, 512, 512], help="k j i (default 600 512 512)")
    parser.add_argument("--dtype", default="int16", help="voxel type (default int16, as a CT)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each on a fresh volume node (default 3)")
    args = parser.parse_args()

    import slicer

    scene = slicer.vtkMRMLScene()
    client = EngineClient(env=dict(os.environ, OMP_NUM_THREADS="1"))
    client.start()
    assert client.status().wait(120), "the engine did not start"
    rounds = []
    try:
        for _ in range(args.repeats):
            node = ct_like_volume_node(scene, tuple(args.shape), np.dtype(args.dtype))
            rounds.append(one_round(client, node))
            print(json.dumps(rounds[-1]), flush=True)
            scene.RemoveNode(node)
    finally:
        client.stop()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(json.dumps({"shape": args.shape, "dtype": args.dtype, "longest_s": max(r["longest_s"] for r in rounds),
                      "first_request_after_s": max(r["first_request_after_s"] for r in rounds),
                      "date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                      "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
