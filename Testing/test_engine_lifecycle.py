"""The engine's lifecycle through a launcher, as in Slicer: ``PythonSlicer`` starts the real interpreter
as its child (``launcher_stand_in.py`` does the same), so stopping, killing or replacing the engine must
end that interpreter and its children, not only the launcher; checked with psutil. Also: stopping never
blocks for more than half a second, dead engines' folders are removed (and only those), logs are private,
settings set after Slicer started reach the engine, and a large volume goes to the engine a few
milliseconds at a time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from SPDSegmentLib.core import prompts
from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.core.volume import Volume, read
from SPDSegmentLib.engine import processes, protocol
from SPDSegmentLib.engine.client import EngineClient, EngineDied

from launcher_stand_in import make_launcher

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the launcher stand-in is a POSIX executable")
TINY = "tiny_sam_test"
QUIET = {"OMP_NUM_THREADS": "1", "SPDSEGMENT_RUNTIME": "torch"}  # test engines share 2 cores with the suite


@pytest.fixture()
def launcher(tmp_path):
    return make_launcher(tmp_path)


def started(client: EngineClient, timeout: float = 180) -> EngineClient:
    assert client.status().wait(timeout), "the engine did not answer"
    return client


def gone(*pids: int, timeout: float = 5.0) -> bool:
    """Whether none of ``pids`` runs any more (a zombie awaiting its parent counts as gone)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        running = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    running.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not running:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def long_case(sample_paths):
    """A volume six times as long with a click on every slice: seconds of work with the tiny model."""
    volume = read(sample_paths["image"])
    big = Volume(np.ascontiguousarray(np.tile(volume.array, (1, 6, 1))), volume.ijk_to_lps, name="long")
    big.array.flags.writeable = False
    ijk = np.array([[17.0, j, 17.0] for j in range(big.shape[1])])
    return big, prompts.to_voxels(prompts.from_ijk(ijk), big, axis=1)


def busy(client, long_case):
    """A request the engine is working on (progress has come)."""
    from SPDSegmentLib.core.pipeline import SegmentOptions

    handle = client.segment(*long_case, TINY, SegmentOptions(mode="raw"), device="cpu")
    deadline = time.perf_counter() + 120
    while handle.state()[0] not in ("encode", "decode"):
        assert not handle.done and time.perf_counter() < deadline, handle.state()
        time.sleep(0.01)
    return handle


# ---------------------------------------------------------------- through the launcher

def test_the_engine_runs_as_the_launchers_child(launcher, tmp_path):
    client = started(EngineClient(python=str(launcher), env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs"))
    try:
        assert client.pid != client.launcher_pid  # the pid the engine reported is the real interpreter's
        assert psutil.Process(client.pid).ppid() == client.launcher_pid
        assert client.status().wait(30)
    finally:
        client.stop()
    assert gone(client.pid, client.launcher_pid)


def test_stopping_a_busy_engine_ends_the_interpreter_within_half_a_second(launcher, tmp_path, long_case):
    client = started(EngineClient(python=str(launcher), env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs"))
    assert client.load_model(TINY, "cpu").wait(180)
    handle = busy(client, long_case)
    engine_pid, launcher_pid = client.pid, client.launcher_pid
    began = time.perf_counter()
    client.stop()
    took = time.perf_counter() - began
    assert took < 0.5, f"stop() blocked for {took:.2f} s"
    assert handle.done and handle.cancelled
    assert gone(engine_pid, launcher_pid), "an engine process outlived stop()"


def test_stopping_a_frozen_engine_kills_it_within_half_a_second(launcher, tmp_path):
    client = started(EngineClient(python=str(launcher), env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs"))
    engine_pid, launcher_pid = client.pid, client.launcher_pid
    os.kill(engine_pid, signal.SIGSTOP)  # stuck in native code: reads nothing, never exits by itself
    began = time.perf_counter()
    client.stop()
    took = time.perf_counter() - began
    assert took < 0.5, f"stop() blocked for {took:.2f} s"
    assert gone(engine_pid, launcher_pid)


SPAWNER = """
import os, subprocess, sys
folder = os.environ.pop("SPD_TEST_CHILDREN", "")
if folder:  # a worker process of each interpreter in the engine's tree, as a library might start one
    env = dict(os.environ)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    open(os.path.join(folder, str(child.pid)), "w").close()
    os.environ["SPD_TEST_CHILDREN"] = folder  # for the interpreter the launcher starts next
"""


def test_a_killed_engine_and_its_children_are_gone_and_the_next_request_starts_a_fresh_one(launcher, tmp_path,
                                                                                            long_case):
    hooks, children = tmp_path / "hooks", tmp_path / "children"
    hooks.mkdir()
    children.mkdir()
    (hooks / "sitecustomize.py").write_text(SPAWNER)
    path = [str(hooks)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, **QUIET, SPD_TEST_CHILDREN=str(children), PYTHONPATH=os.pathsep.join(path))
    client = EngineClient(python=str(launcher), env=env, log_folder=tmp_path / "logs")
    try:
        assert client.load_model(TINY, "cpu").wait(180)
        handle = busy(client, long_case)
        engine_pid, launcher_pid = client.pid, client.launcher_pid
        workers = [int(p.name) for p in children.iterdir()]
        assert len(workers) >= 2 and all(psutil.pid_exists(w) for w in workers)  # the launcher's and the engine's
        client.kill()  # as the out-of-memory killer would
        assert handle.wait(30)
        with pytest.raises(EngineDied, match="stopped unexpectedly"):
            handle.result()
        assert gone(engine_pid, launcher_pid, *workers), "a process of the engine's tree survived"
        after = client.status()
        assert after.wait(180) and client.pid != engine_pid
    finally:
        client.stop()
    for worker in children.iterdir():  # the second engine's workers went with stop()
        assert gone(int(worker.name))


def test_kill_tree_ends_grandchildren_of_a_launcher(tmp_path):
    """The tree is collected before anything is killed: the launcher's child and its child die with it."""
    script = tmp_path / "tree.py"
    script.write_text("import subprocess, sys, time\n"
                      "if len(sys.argv) > 1:\n"
                      "    subprocess.Popen([sys.executable, sys.argv[0]]); time.sleep(600)\n"
                      "else:\n    time.sleep(600)\n")
    top = subprocess.Popen([sys.executable, str(script), "parent"], **processes.new_group_options())
    deadline = time.perf_counter() + 30
    while not psutil.Process(top.pid).children(recursive=True):
        assert time.perf_counter() < deadline
        time.sleep(0.02)
    family = [top.pid] + [p.pid for p in psutil.Process(top.pid).children(recursive=True)]
    assert processes.kill_tree([processes.identity(top.pid)]) == len(family)
    top.wait(5)
    assert gone(*family)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.10 makes a process group only with a new session")
def test_the_engine_leads_its_own_process_group_in_the_callers_session():
    """Its own group (its tree can be ended as one), the caller's session (Linux gives each session one share of
    the CPU: an engine in a session of its own was starved when the cores were busy)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], **processes.new_group_options())
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        assert os.getsid(child.pid) == os.getsid(0)
    finally:
        child.kill()
        child.wait(5)


def test_killing_only_the_launcher_is_noticed_and_its_engine_ended(launcher, tmp_path):
    client = started(EngineClient(python=str(launcher), env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs"))
    engine_pid = client.pid
    os.kill(client.launcher_pid, signal.SIGKILL)  # what Popen.kill() alone used to do
    deadline = time.perf_counter() + 10
    while client.alive and time.perf_counter() < deadline:
        time.sleep(0.02)
    client.poll()
    assert client.last_death and "stopped unexpectedly" in client.last_death
    assert gone(engine_pid), "the interpreter outlived its launcher"
    client.stop()


def test_a_hung_request_ends_the_real_interpreter(launcher, tmp_path, long_case):
    client = EngineClient(python=str(launcher), env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs",
                          hang_seconds=0.5)
    try:
        assert client.load_model(TINY, "cpu").wait(180)
        handle = busy(client, long_case)
        engine_pid = client.pid
        os.kill(engine_pid, signal.SIGSTOP)
        handle.cancel()
        time.sleep(1.0)
        client.poll()
        assert not client.alive and "did not stop within" in client.log_path.read_text()
        assert gone(engine_pid)
    finally:
        client.stop()


# ---------------------------------------------------------------- folders and logs

def dead_identity() -> dict:
    """The identity of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return {"pid": int(done.stdout), "started": time.time() - 5}


def test_a_new_engine_removes_dead_engines_folders_and_only_those(tmp_path):
    root = tmp_path / "share"
    processes.private_folder(root)
    dead = root / "engine-dead"
    dead.mkdir()
    (dead / "volume-x.npy").write_bytes(b"voxels")
    processes.record_owners(dead, [dead_identity()])
    live = root / "engine-live"
    live.mkdir()
    processes.record_owners(live, [dead_identity(), processes.identity(os.getpid())])  # the engine still runs
    reused = root / "engine-reused"
    reused.mkdir()
    processes.record_owners(reused, [{"pid": os.getpid(), "started": time.time() - 3600}])  # a pid given again
    unrecorded = root / "engine-unknown"
    unrecorded.mkdir()
    other = root / "notes"
    other.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    processes.record_owners(target, [dead_identity()])
    (root / "engine-link").symlink_to(target, target_is_directory=True)

    client = EngineClient(env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs", share_root=root)
    try:
        client.start()
        left = sorted(p.name for p in root.iterdir())
        assert "engine-dead" not in left and "engine-reused" not in left
        assert {"engine-live", "engine-unknown", "notes", "engine-link"} <= set(left)
        assert (target / "keep.txt").is_file()
        mine = client.share_folder
        assert mine.parent == root and oct(mine.stat().st_mode & 0o777) == "0o700"
        started(client)
        owners = json.loads((mine / processes.OWNER_FILE).read_text())
        assert {o["pid"] for o in owners} == {os.getpid(), client.pid}
        # a later client (another Slicer) leaves this live one's folder alone
        assert mine not in processes.remove_dead_folders(root) and mine.is_dir()
    finally:
        client.stop()
    assert not mine.exists()


def test_logs_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        client = EngineClient(env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs")
        client.start()
        assert oct((tmp_path / "logs").stat().st_mode & 0o777) == "0o700"
        assert oct(client.log_path.stat().st_mode & 0o777) == "0o600"
        assert oct(client.share_folder.stat().st_mode & 0o777) == "0o700"
    finally:
        os.umask(old)
        client.stop()


def test_the_default_log_folder_is_the_user_cache_not_a_shared_temporary_folder(user_cache):
    assert EngineClient().log_folder == user_cache / "logs"


# ---------------------------------------------------------------- settings and the cache folder

def test_settings_set_after_start_up_reach_the_next_engine(monkeypatch, tmp_path):
    from SPDSegmentLib.slicer_side import adapter

    startup = {k: v for k, v in os.environ.items() if not k.startswith("SPDSEGMENT_")}
    startup["SPDSEGMENT_PRECISION"] = "bf16"  # set before Slicer started, then removed in the console
    monkeypatch.setattr(adapter, "startup_environment", lambda: dict(startup))
    monkeypatch.setattr(adapter, "slicer_cache_folder", lambda: str(tmp_path / "SlicerCache"))
    monkeypatch.delenv("SPDSEGMENT_CACHE", raising=False)
    monkeypatch.delenv("SPDSEGMENT_PRECISION", raising=False)
    monkeypatch.setenv("SPDSEGMENT_RUNTIME", "torch")  # set in Slicer's Python console
    client = EngineClient(env=adapter.engine_environment, log_folder=tmp_path / "logs")
    try:
        status = started(client).status()
        assert status.wait(30)
        seen = status.result()
        assert seen["settings"].get("SPDSEGMENT_RUNTIME") == "torch"
        assert "SPDSEGMENT_PRECISION" not in seen["settings"]
        assert seen["cache_folder"] == str(tmp_path / "SlicerCache" / "SPDSegment")
        monkeypatch.setenv("SPDSEGMENT_RUNTIME", "openvino")  # changed later: the next engine sees it
        client.stop()
        again = started(client).status()
        assert again.wait(30) and again.result()["settings"]["SPDSEGMENT_RUNTIME"] == "openvino"
    finally:
        client.stop()


def test_the_cache_folder_rule(monkeypatch, tmp_path):
    from SPDSegmentLib.core.models.download import cache_dir

    monkeypatch.delenv("SPDSEGMENT_CACHE", raising=False)
    monkeypatch.delenv("SPDSEGMENT_HOST_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "spdsegment"
    monkeypatch.setenv("SPDSEGMENT_HOST_CACHE", str(tmp_path / "SlicerCache"))
    assert cache_dir() == tmp_path / "SlicerCache" / "SPDSegment"
    monkeypatch.setenv("SPDSEGMENT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# ---------------------------------------------------------------- a large volume, a few milliseconds at a time

def test_a_large_volume_is_written_in_slabs_and_its_request_waits_for_it(tmp_path, monkeypatch, sample_paths):
    from SPDSegmentLib.engine import client as client_module

    volume = read(sample_paths["image"])
    big = Volume(np.ascontiguousarray(np.tile(volume.array, (40, 1, 1))), volume.ijk_to_lps, name="big")
    big.array.flags.writeable = False
    clicks = prompts.to_voxels(prompts.from_ijk(np.array([[17.0, 20.0, 5.0]])), big, axis=0)
    monkeypatch.setattr(protocol.VolumeShelf, "SLAB_BYTES", 64 << 10)
    monkeypatch.setattr(client_module, "WRITE_BUDGET_S", 0.0)  # one slab per poll
    client = started(EngineClient(env=dict(os.environ, **QUIET), log_folder=tmp_path / "logs"))
    try:
        handle = client.encode_ahead(big, clicks, "no-such-model", device="cpu")
        polls = 0
        while handle.waiting_for_volume:
            assert handle.state()[0].startswith("sharing the volume")
            client.poll()
            polls += 1
        assert polls >= big.array.nbytes // (64 << 10) - 1  # slab by slab, never all at once
        assert handle.wait(60)
        with pytest.raises(Exception, match="no-such-model"):
            handle.result()
        files = list(client.share_folder.glob("volume-*.npy"))
        assert len(files) == 1 and np.array_equal(np.load(files[0]), big.array)
        # the same voxels again: no second file, the request leaves at once
        again = client.encode_ahead(big, clicks, "no-such-model", device="cpu")
        assert not again.waiting_for_volume and len(list(client.share_folder.glob("volume-*.npy"))) == 1
        again.wait(60)
        # a request cancelled while its volume is being written never reaches the engine
        other = Volume(np.ascontiguousarray(big.array[::-1]), big.ijk_to_lps, name="other")
        queued = client.encode_ahead(other, clicks, "no-such-model", device="cpu")
        assert queued.waiting_for_volume
        queued.cancel()
        assert queued.done and queued.cancelled and not client._outbox
        # shared ahead (the effect does it when a source volume is chosen): the polls write it, nothing waits
        ahead = Volume(np.ascontiguousarray(big.array[:, ::-1]), big.ijk_to_lps, name="ahead")
        client.share_volume(ahead)
        while client._shelf.pending_bytes:
            client.poll()
        request = client.encode_ahead(ahead, clicks, "no-such-model", device="cpu")
        assert not request.waiting_for_volume
        request.wait(60)
    finally:
        client.stop()


def test_the_engine_checks_the_voxels_it_is_given(tmp_path):
    """NaN voxels are refused in the engine (Slicer's main thread no longer scans the volume)."""
    array = np.zeros((4, 6, 5), np.float32)
    array[2, 3, 1] = np.nan
    shelf = protocol.VolumeShelf(tmp_path)
    ref = shelf.reference(Volume(array, np.eye(4), name="CT with holes"))
    assert shelf.write_some(1.0)
    with pytest.raises(InputError, match="'CT with holes' has 1 NaN or infinite voxels"):
        protocol.VolumeRack().open(ref)
