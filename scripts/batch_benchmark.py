"""The batch measurements of docs/performance.md ("Cohorts: spd batch"), in one command.

    python scripts/make_cohort.py --data ../shared/data/hippocampus --out /tmp/cohort --cases 100
    python scripts/batch_benchmark.py --cohort /tmp/cohort --work /tmp/batch_bench

Steps (``--steps``; each records ``uptime`` before and after, since the build machine is shared):
  loop     ``spd segment`` once per case in a shell-like loop (a new process each: imports, model load)
  batch    ``spd batch`` in one process: cases per hour, per-case overhead (the row's seconds minus the
           pipeline's own), peak memory
  ray      ``spd batch --cluster local --workers 2``: the same, Ray's own cost per case, and whether every
           mask is byte-identical to the ``batch`` step's
  kill     ``spd batch`` SIGKILLed in the middle of a case after half the cases: what is on disk, then the
           rerun (which cases it skips, which it does)
  raykill  one Ray worker SIGKILLed in the middle of a case: the batch goes on, the case is retried
Writes WORK/benchmark.json and prints a summary. Only processes this script started are killed (by pid).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPD = [sys.executable, "-m", "SPDSegmentLib.cli"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def manifest(cohort: Path, work: Path, count: int, name: str) -> Path:
    """The first ``count`` cases of the cohort's manifest, with absolute paths."""
    with open(cohort / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]
    path = work / f"{name}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "points"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"case": row["case"], "image": str(cohort / row["image"]),
                             "points": str(cohort / row["points"])})
    return path


def read_rows(path: Path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def timed(argv, **kwargs):
    """(wall seconds, peak resident MiB of the process, completed process) through /usr/bin/time."""
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *argv], capture_output=True, text=True, **kwargs)
    line = [l for l in proc.stderr.splitlines() if l.startswith("TIME ")][-1].split()
    return float(line[1]), float(line[2]) / 1024.0, proc


def overhead(rows) -> dict:
    done = [r for r in rows if r["status"] == "done"]
    extra = [float(r["seconds"]) - float(r["segment_seconds"]) for r in done]
    seg = [float(r["segment_seconds"]) for r in done]
    by_worker, finished = {}, {}
    for r in done:
        by_worker[r["worker"]] = max(by_worker.get(r["worker"], 0.0), float(r["peak_mb"] or 0))
        finished.setdefault(r["worker"], []).append((os.stat(r["output"]).st_mtime, float(r["seconds"])))
    # between one output of a worker and its next: the next case's own seconds, and the time outside any case
    # (the loop, the results CSV, in Ray the hand-out); a pause of the whole machine shows up here too
    between = [b[0] - a[0] - b[1] for times in finished.values() for a, b in zip(sorted(times), sorted(times)[1:])]
    return {"done": len(done), "failed": sum(r["status"] == "failed" for r in rows),
            "skipped": sum(r["status"] == "skipped" for r in rows),
            "segment_s_mean": statistics.mean(seg) if seg else None,
            "overhead_s_mean": statistics.mean(extra) if extra else None,
            "overhead_s_max": max(extra) if extra else None,
            "between_cases_s_median": statistics.median(between) if between else None,
            "between_cases_s_mean": statistics.mean(between) if between else None,
            "between_cases_over_1s": sorted(round(g, 1) for g in between if g > 1),
            "peak_mb_per_worker": by_worker}


def step_loop(cohort, work, count):
    cases = read_rows(manifest(cohort, work, count, "loop"))
    out = work / "loop"
    out.mkdir(exist_ok=True)
    before, walls, peaks = uptime(), [], []
    start = time.perf_counter()
    for row in cases:
        wall, peak, proc = timed([*SPD, "segment", row["image"], "--points", row["points"], "--out",
                                  str(out / f"{row['case']}_spd.seg.nrrd"), "--quiet"])
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
        walls.append(wall)
        peaks.append(peak)
    total = time.perf_counter() - start
    return {"cases": len(cases), "wall_s": total, "cases_per_hour": 3600 * len(cases) / total,
            "per_case_s_mean": statistics.mean(walls), "peak_mb": max(peaks), "uptime_before": before,
            "uptime_after": uptime()}


def step_batch(cohort, work, count, name="batch", extra=()):
    path = manifest(cohort, work, count, name)
    out = work / name
    before = uptime()
    wall, peak, proc = timed([*SPD, "batch", str(path), "--out", str(out), "--quiet", *extra])
    rows = read_rows(out / "results.csv")
    result = {"cases": count, "wall_s": wall, "process_peak_mb": peak, "exit": proc.returncode,
              "cases_per_hour": 3600 * sum(r["status"] == "done" for r in rows) / wall, **overhead(rows),
              "stdout": proc.stdout.strip(), "ray_line": [l for l in proc.stderr.splitlines() if l.startswith("ray:")],
              "uptime_before": before, "uptime_after": uptime()}
    return result, rows


def step_ray(cohort, work, count, batch_rows):
    result, rows = step_batch(cohort, work, count, "ray", ("--cluster", "local", "--workers", "2"))
    single = {r["case"]: r["output_sha256"] for r in batch_rows or []}
    same = [r["case"] for r in rows if single.get(r["case"]) == r["output_sha256"] and r["output_sha256"]]
    result["identical_to_batch"] = f"{len(same)} of {len(rows)}" if single else "batch step not run"
    return result


def verify_folder(folder: Path) -> dict:
    """Every mask has its provenance sidecar and matches its recorded digest; hidden leftovers listed."""
    masks = sorted(folder.glob("*_spd.seg.nrrd"))
    bad = []
    for mask in masks:
        sidecar = mask.with_name(mask.name.replace(".seg.nrrd", ".provenance.json"))
        try:
            recorded = json.loads(sidecar.read_text())["output"]["sha256"]
        except (OSError, ValueError, KeyError):
            bad.append(mask.name)
            continue
        if hashlib.sha256(mask.read_bytes()).hexdigest() != recorded:
            bad.append(mask.name)
    return {"masks": len(masks), "sidecars": len(list(folder.glob("*.provenance.json"))), "mismatched": bad,
            "hidden_leftovers": sorted(p.name for p in folder.iterdir() if p.name.startswith("."))}


def descendants(pid: int) -> list:
    """Processes below ``pid`` (those this script started, through spd and Ray)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_sidecars(folder: Path, count: int, proc, timeout: float = 3600) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if folder.is_dir() and len(list(folder.glob("*.provenance.json"))) >= count:
            return True
        time.sleep(0.05)
    return False


def step_kill(cohort, work, count, mid_case_s):
    path = manifest(cohort, work, count, "kill")
    out = work / "kill"
    argv = [*SPD, "batch", str(path), "--out", str(out), "--quiet"]
    before = uptime()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reached = wait_for_sidecars(out, count // 2, proc)
    time.sleep(mid_case_s)  # into the next case
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = verify_folder(out)
    results_rows = len(read_rows(out / "results.csv")) if (out / "results.csv").exists() else 0
    wall, _, rerun = timed(argv)
    rows = read_rows(out / "results.csv")
    return {"cases": count, "killed_after_sidecars": count // 2 if reached else None, "mid_case_sleep_s": mid_case_s,
            "exit_of_killed": proc.returncode, "on_disk_after_kill": after_kill,
            "results_rows_after_kill": results_rows, "rerun_exit": rerun.returncode, "rerun_wall_s": wall,
            "rerun": {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")},
            "after_rerun": verify_folder(out), "uptime_before": before, "uptime_after": uptime()}


def step_raykill(cohort, work, count):
    path = manifest(cohort, work, count, "raykill")
    out = work / "raykill"
    before = uptime()
    proc = subprocess.Popen([*SPD, "batch", str(path), "--out", str(out), "--quiet", "--cluster", "local",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_sidecars(out, 1, proc)
    victim = None
    deadline = time.time() + 600
    while victim is None and time.time() < deadline and proc.poll() is None:
        running = [p for p in descendants(proc.pid) if "CaseActor.run" in cmdline(p)]
        victim = running[0] if running else None
        time.sleep(0.05)
    if victim is not None:
        time.sleep(0.5)  # in the middle of its case
        os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    rows = read_rows(out / "results.csv")
    return {"cases": count, "killed_worker_pid": victim, "exit": proc.returncode, "stdout": stdout.strip(),
            "statuses": {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")},
            "workers_seen": sorted({r["worker"] for r in rows}), "after": verify_folder(out),
            "uptime_before": before, "uptime_after": uptime()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", default="/tmp/cohort", help="scripts/make_cohort.py's folder")
    parser.add_argument("--work", default="/tmp/batch_bench", help="outputs (emptied first)")
    parser.add_argument("--cases", type=int, default=100, help="cases of the batch and ray steps")
    parser.add_argument("--loop-cases", type=int, default=100, help="cases of the spd segment loop")
    parser.add_argument("--kill-cases", type=int, default=20, help="cases of the kill steps")
    parser.add_argument("--steps", nargs="*", default=["loop", "batch", "ray", "kill", "raykill"])
    args = parser.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    cohort = Path(args.cohort).resolve()
    report = {"machine": uptime(), "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    batch_rows = None

    def save():
        (work / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))

    for step in args.steps:
        print(f"{step} ... ({uptime()})", file=sys.stderr, flush=True)
        if step == "loop":
            report["loop"] = step_loop(cohort, work, args.loop_cases)
        elif step == "batch":
            report["batch"], batch_rows = step_batch(cohort, work, args.cases)
        elif step == "ray":
            report["ray"] = step_ray(cohort, work, args.cases, batch_rows)
        elif step == "kill":
            mid = (report.get("batch", {}).get("segment_s_mean") or 2.0) / 2
            report["kill"] = step_kill(cohort, work, args.kill_cases, mid)
        elif step == "raykill":
            report["raykill"] = step_raykill(cohort, work, args.kill_cases)
        save()
        print(json.dumps(report[step], indent=1, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
