"""The first Preview of the sample case while both cores are busy: through the engine or in-process.

Two processes spin on the CPU (``speed.busy_processes``) while a Preview of 6 slices of moderate sloppy clicks
runs from cold (every slice encoded). ``--own-session`` starts the engine in a session of its own, as before
the engine led a process group in its caller's session (docs/performance.md, "Correction latency"):

    python scripts/busy_first_preview.py --where engine
    python scripts/busy_first_preview.py --where engine --own-session
    python scripts/busy_first_preview.py --where in-process
"""
from __future__ import annotations

import argparse
import time

from SPDSegmentLib.core.cache import EmbeddingCache
from SPDSegmentLib.core.pipeline import SegmentOptions, load_model, segment
from SPDSegmentLib.core.sample import sample_case
from SPDSegmentLib.core.volume import read, read_label
from SPDSegmentLib.engine import processes
from SPDSegmentLib.engine.client import EngineClient
from SPDSegmentLib.research import speed

MODEL = "spd-hippocampus"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--where", choices=["engine", "in-process"], default="engine")
    parser.add_argument("--own-session", action="store_true", help="the engine in a session of its own")
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--busy", type=int, default=2, help="processes spinning meanwhile")
    args = parser.parse_args(argv)
    sample = sample_case()
    volume = read(sample.image)
    label = read_label(sample.label, like=volume)
    prompts = speed._case(volume, label, sample.axis, n_slices=args.slices)
    if args.own_session:
        processes.new_group_options = lambda: {"start_new_session": True}
    if args.where == "engine":
        client = EngineClient()
        try:
            client.load_model(MODEL, "cpu").wait()
            with speed.busy_processes(args.busy):
                t0 = time.perf_counter()
                handle = client.segment(volume, prompts, MODEL, SegmentOptions(), "cpu")
                handle.wait(interval=0.001)
                seconds, timings = time.perf_counter() - t0, handle.result().timings
        finally:
            client.stop()
    else:
        model = load_model(MODEL)
        with speed.busy_processes(args.busy):
            t0 = time.perf_counter()
            timings = segment(volume, prompts, model, SegmentOptions(), cache=EmbeddingCache()).timings
            seconds = time.perf_counter() - t0
    where = args.where + (" (own session)" if args.own_session else "")
    print(f"{where}: first Preview of {len(set(prompts.slice_index()))} clicked slices with {args.busy} busy "
          f"processes: {seconds:.1f} s (encode {timings.get('encode_s', 0):.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
