"""Executors for a tile's blocks: completion, resume after SIGKILL, no retraining, failures, status.

The workload is the toy block job (a deterministic accumulator that checkpoints every
step), whose uninterrupted result is the reference every executed block must match.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from citygen.cli import entrypoint
from citygen.distributed import BlockTask, LocalExecutor, RayExecutor, read_state, run_tile, tile_status
from citygen.distributed import local as local_mod
from citygen.distributed.state import update_state
from citygen.distributed.tile import _tile_lock
from citygen.distributed.toy_job import ATTEMPTS_LOG, CHECKPOINT, block_frequencies, toy_block_job
from citygen.errors import CitygenError

TOY = "citygen.distributed.toy_job:toy_block_job"
STEPS = 20
KILL_AT_STEP = 5


def toy_tasks(tile: Path, ids: list[str], **kwargs) -> list[BlockTask]:
    args = {"steps": STEPS, "step_seconds": 0.05}
    return [BlockTask(b, str(tile / b), TOY, {**args, **kwargs.get(b, {})}) for b in ids]


def reference_result(tmp_path: Path, block_id: str) -> dict:
    """The block's result from one uninterrupted in-process run of the toy job."""
    return toy_block_job(block_id, str(tmp_path / "reference" / block_id), False, steps=STEPS, step_seconds=0)


def block_files_mtimes(block_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in block_dir.iterdir()}


class Killer(threading.Thread):
    """Waits (in a thread) until a block is running past a checkpoint, then SIGKILLs its worker."""

    def __init__(self, block_dir: Path, tile_dir: Path, at_step: int = KILL_AT_STEP, timeout_s: float = 60):
        super().__init__(daemon=True)
        self.block_dir, self.tile_dir, self.at_step, self.timeout_s = block_dir, tile_dir, at_step, timeout_s
        self.killed_pid: int | None = None
        self.status_while_running: dict | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            state = read_state(self.block_dir)
            if state and state["state"] == "running" and state.get("last_checkpoint_step", 0) >= self.at_step:
                assert state["pid"] != os.getpid()
                self.status_while_running = tile_status(self.tile_dir)
                os.kill(state["pid"], signal.SIGKILL)
                self.killed_pid = state["pid"]
                return
            time.sleep(0.005)


def check_killed_block_resumed(killer: Killer, tile: Path, block_id: str) -> None:
    block_dir = tile / block_id
    assert killer.killed_pid is not None, "the worker was never seen running"
    state = read_state(block_dir)
    assert state["state"] == "done" and state["attempts"] == 2 and state["resumed"] is True
    starts = json.loads((block_dir / ATTEMPTS_LOG).read_text())
    assert [a["pid"] for a in starts][0] == killer.killed_pid
    assert starts[0]["start_step"] == 0
    assert starts[1]["start_step"] >= KILL_AT_STEP  # resumed from a checkpoint, not from scratch
    running = {b["block_id"]: b for b in killer.status_while_running["blocks"]}[block_id]
    assert running["state"] == "running" and running["pid"] == killer.killed_pid and running["alive"] is True


# ---------------------------------------------------------------------------- the toy job itself


def test_toy_job_matches_closed_form_and_resume_is_exact(tmp_path):
    # v_n = sum_{k=1..n} 0.9^(n-k) sin(k f), evaluated independently in plain Python.
    freqs = block_frequencies("b7")
    expected = [sum(0.9 ** (STEPS - k) * math.sin(k * f) for k in range(1, STEPS + 1)) for f in freqs]
    whole = toy_block_job("b7", str(tmp_path / "whole"), False, steps=STEPS, step_seconds=0)
    assert whole["value"] == pytest.approx(expected, rel=1e-12, abs=1e-12)

    split = tmp_path / "split"
    with pytest.raises(RuntimeError, match="toy failure at step 7"):
        toy_block_job("b7", str(split), False, steps=STEPS, step_seconds=0, fail_at_step=7)
    resumed = toy_block_job("b7", str(split), True, steps=STEPS, step_seconds=0)
    assert resumed == whole  # bit-identical after an interruption
    assert [a["start_step"] for a in json.loads((split / ATTEMPTS_LOG).read_text())] == [0, 7]
    again = toy_block_job("b7", str(split), True, steps=STEPS, step_seconds=1000)  # finished: no training
    assert again == whole


# ---------------------------------------------------------------------------- local executor


def test_local_executor_survives_sigkill_and_resumes(tmp_path):
    tile = tmp_path / "tile"
    ids = ["b0", "b1", "b2"]
    killer = Killer(tile / "b1", tile)
    killer.start()
    # b1 steps slower, so the killer thread cannot miss its window even on a loaded machine.
    result = run_tile(toy_tasks(tile, ids, b1={"step_seconds": 0.1}), LocalExecutor(max_parallel=2, gpus=0), tile)
    killer.join()

    assert result.ok and sorted(result.blocks) == ids
    for b in ids:
        assert result.blocks[b].result == reference_result(tmp_path, b)
        assert json.loads((tile / b / "result.json").read_text()) == reference_result(tmp_path, b)
    check_killed_block_resumed(killer, tile, "b1")
    assert result.blocks["b1"].attempts == 2
    assert result.blocks["b0"].attempts == 1 and result.blocks["b2"].attempts == 1

    status = tile_status(tile)
    assert status["complete"] and status["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    assert [b["last_checkpoint_step"] for b in status["blocks"]] == [STEPS] * 3

    # A second run retrains nothing: no attempt, no file touched.
    before = {b: block_files_mtimes(tile / b) for b in ids}
    again = run_tile(toy_tasks(tile, ids), LocalExecutor(gpus=0), tile)
    assert all(o.skipped and o.state == "done" for o in again.blocks.values())
    assert {b: o.attempts for b, o in again.blocks.items()} == {"b0": 1, "b1": 2, "b2": 1}
    assert {b: block_files_mtimes(tile / b) for b in ids} == before
    assert again.blocks["b0"].result == reference_result(tmp_path, "b0")


def test_local_executor_job_errors_and_retries(tmp_path):
    tile = tmp_path / "tile"
    tasks = toy_tasks(tile, ["ok", "flaky", "broken", "crashing"], flaky={"fail_at_step": 3, "fail_attempts": 1},
                      broken={"fail_at_step": 2}, crashing={"fail_at_step": 1, "fail_mode": "sigkill"})
    result = run_tile(tasks, LocalExecutor(max_parallel=2, gpus=0, max_retries=1), tile)

    assert result.failed == ["broken", "crashing"]
    assert result.blocks["ok"].state == "done" and result.blocks["ok"].attempts == 1
    flaky = result.blocks["flaky"]  # failed once, retried, resumed at its step-3 checkpoint
    assert flaky.state == "done" and flaky.attempts == 2 and flaky.result == reference_result(tmp_path, "flaky")
    assert [a["start_step"] for a in json.loads((tile / "flaky" / ATTEMPTS_LOG).read_text())] == [0, 3]

    broken = read_state(tile / "broken")
    assert broken["state"] == "failed" and broken["attempts"] == 2
    assert broken["error"] == "RuntimeError: toy failure at step 2" == result.blocks["broken"].error
    assert not (tile / "broken" / "result.json").exists()
    assert "toy failure at step 2" in (tile / "broken" / "worker.log").read_text()  # the traceback
    crashing = read_state(tile / "crashing")
    assert crashing["state"] == "failed" and crashing["attempts"] == 2
    assert crashing["error"].startswith("worker process killed by SIGKILL")
    with pytest.raises(CitygenError, match="2 block\\(s\\) failed: broken: RuntimeError"):
        result.raise_for_failures()

    status = tile_status(tile)
    assert status["counts"] == {"pending": 0, "running": 0, "done": 2, "failed": 2} and not status["complete"]


def test_local_executor_gives_each_worker_its_own_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(local_mod, "visible_gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert LocalExecutor(gpus=[1, 2]).devices() == ["5", "6"]  # indices among the visible GPUs
    assert LocalExecutor().devices() == ["3", "5", "6", "7"]
    assert LocalExecutor(gpus=0).devices() == []
    with pytest.raises(CitygenError, match="out of range"):
        LocalExecutor(gpus=[4]).devices()

    tile = tmp_path / "tile"
    probe = "citygen.distributed.toy_job:toy_env_job"
    tasks = [BlockTask(f"b{i}", str(tile / f"b{i}"), probe, {"names": ["CUDA_VISIBLE_DEVICES"]}) for i in range(3)]
    result = run_tile(tasks, LocalExecutor(gpus=[1, 2]), tile)
    seen = [o.result["env"]["CUDA_VISIBLE_DEVICES"] for o in result.blocks.values()]
    assert set(seen) == {"5", "6"}  # one device per worker, both used, none other


# ---------------------------------------------------------------------------- tile state and CLI


def test_tile_status_and_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich: one line per table row
    tile = tmp_path / "tile"
    tasks = [BlockTask(b, str(tile / b), TOY, {"steps": 3, "step_seconds": 0}) for b in ("a", "b")]
    run_tile(tasks[:1], LocalExecutor(gpus=0), tile)
    # Block b: a worker that died without anyone noticing (the executor itself was killed).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    update_state(tile / "b", block_id="b", state="running", attempts=1, pid=dead.pid, host=os.uname().nodename)
    with _tile_lock(tile):  # register b in the manifest the way run_tile does
        from citygen.distributed.tile import _write_manifest
        _write_manifest(tile, tasks, LocalExecutor())

    status = tile_status(tile)
    rows = {b["block_id"]: b for b in status["blocks"]}
    assert status["counts"] == {"pending": 0, "running": 1, "done": 1, "failed": 0} and not status["complete"]
    assert rows["a"]["finished"] and rows["a"]["attempts"] == 1 and rows["a"]["last_checkpoint_step"] == 3
    assert rows["b"]["alive"] is False and not rows["b"]["finished"]

    assert entrypoint(["status", str(tile), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == status["counts"]
    assert entrypoint(["status", str(tile)]) == 0
    lines = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    assert "done" in lines["a"] and "running (worker gone)" in lines["b"] and str(dead.pid) in lines["b"]

    assert entrypoint(["status", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a folder" in capsys.readouterr().err
    assert entrypoint(["status", str(tmp_path)]) == 2
    assert "no tile run here" in capsys.readouterr().err

    # The interrupted block resumes on the next run; the finished one is left alone.
    again = run_tile(tasks, LocalExecutor(gpus=0), tile)
    assert again.blocks["a"].skipped and again.blocks["b"].state == "done" and again.blocks["b"].attempts == 2


def test_bad_tasks_are_rejected_before_anything_runs(tmp_path):
    with pytest.raises(CitygenError, match="'module:function'"):
        BlockTask("a", str(tmp_path / "a"), "citygen.distributed.toy_job.toy_block_job")
    with pytest.raises(CitygenError, match="not JSON-serializable"):
        BlockTask("a", str(tmp_path / "a"), TOY, {"steps": object()})
    with pytest.raises(CitygenError, match="cannot import"):
        run_tile([BlockTask("a", str(tmp_path / "a"), "citygen.no_such_module:fn")], LocalExecutor(gpus=0), tmp_path)
    with pytest.raises(CitygenError, match="has no function"):
        run_tile([BlockTask("a", str(tmp_path / "a"), "citygen.distributed.toy_job:nope")], LocalExecutor(gpus=0),
                 tmp_path)
    with pytest.raises(CitygenError, match="duplicate block ids: a"):
        run_tile([BlockTask("a", str(tmp_path / d), TOY) for d in "xy"], LocalExecutor(gpus=0), tmp_path)
    with _tile_lock(tmp_path), pytest.raises(CitygenError, match="another run_tile"):
        run_tile(toy_tasks(tmp_path, ["a"]), LocalExecutor(gpus=0), tmp_path)
    assert not (tmp_path / "a").exists()  # nothing ran


# ---------------------------------------------------------------------------- Ray executor


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'citygen[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_survives_sigkill_and_resumes(tmp_path, ray_local):
    tile = tmp_path / "tile"
    ids = ["b0", "b1", "b2"]
    killer = Killer(tile / "b1", tile)
    killer.start()
    result = run_tile(toy_tasks(tile, ids, b1={"step_seconds": 0.1}), RayExecutor(), tile)
    killer.join()

    assert result.ok
    for b in ids:
        assert result.blocks[b].result == reference_result(tmp_path, b)
    check_killed_block_resumed(killer, tile, "b1")
    assert {b: o.attempts for b, o in result.blocks.items()} == {"b0": 1, "b1": 2, "b2": 1}

    before = {b: block_files_mtimes(tile / b) for b in ids}
    again = run_tile(toy_tasks(tile, ids), RayExecutor(), tile)
    assert all(o.skipped for o in again.blocks.values())
    assert {b: block_files_mtimes(tile / b) for b in ids} == before
    assert (tile / "b1" / CHECKPOINT).is_file()


def test_ray_executor_job_errors_and_worker_deaths(tmp_path, ray_local):
    tile = tmp_path / "tile"
    tasks = toy_tasks(tile, ["ok", "flaky", "broken", "crashing"], flaky={"fail_at_step": 3, "fail_attempts": 1},
                      broken={"fail_at_step": 2}, crashing={"fail_at_step": 1, "fail_mode": "sigkill"})
    result = run_tile(tasks, RayExecutor(max_retries=1), tile)

    assert result.failed == ["broken", "crashing"]
    assert result.blocks["ok"].attempts == 1 and result.blocks["ok"].result == reference_result(tmp_path, "ok")
    flaky = result.blocks["flaky"]
    assert flaky.state == "done" and flaky.attempts == 2 and flaky.result == reference_result(tmp_path, "flaky")
    assert [a["start_step"] for a in json.loads((tile / "flaky" / ATTEMPTS_LOG).read_text())] == [0, 3]
    broken = read_state(tile / "broken")
    assert broken["state"] == "failed" and broken["attempts"] == 2
    assert broken["error"] == "RuntimeError: toy failure at step 2"
    crashing = read_state(tile / "crashing")  # Ray retried the dead worker once, then gave up
    assert crashing["state"] == "failed" and crashing["attempts"] == 2
    assert crashing["error"].startswith("ray task failed")
    assert tile_status(tile)["counts"] == {"pending": 0, "running": 0, "done": 2, "failed": 2}


def test_ray_attempts_respect_the_block_lock(tmp_path, ray_local):
    from citygen.distributed.lease import LEASE_FILE, read_lease

    tile = tmp_path / "tile"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom citygen.distributed.lease import hold_block\n"
        f"with hold_block({str(tile / 'held')!r}):\n    print('holding', flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"holding"
        tasks = toy_tasks(tile, ["held", "free"])
        # straight to the executor (run_tile would refuse the block before Ray saw it)
        outcomes = RayExecutor(max_retries=2, hold_wait_s=0.2).execute(tasks)
    finally:
        holder.kill()
        holder.wait()
    held = outcomes["held"]
    assert held.state == "failed" and held.attempts == 0
    assert held.error.startswith(f"held by pid {holder.pid} on host ")
    assert read_lease(tile / "held")["pid"] == holder.pid  # the holder's files untouched, no state written
    assert not (tile / "held" / "state.json").exists() and not (tile / "held" / ATTEMPTS_LOG).exists()
    assert outcomes["free"].state == "done" and outcomes["free"].result == reference_result(tmp_path, "free")
    assert not (tile / "free" / LEASE_FILE).exists()


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(CitygenError, match=r"pip install 'citygen\[ray\]'"):
        RayExecutor().execute([])


def copy_code(dest: Path) -> Path:
    """The packages a block job runs on, copied to ``dest`` (sources only)."""
    import shutil

    from citygen.distributed.ray_executor import CODE_PACKAGES, code_roots

    for name in CODE_PACKAGES:
        shutil.copytree(Path(code_roots()[0]) / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def fingerprint_in(root: Path) -> tuple[str, list[str]]:
    """code_fingerprint() and code_roots() of a Python started in ``root`` with only it on PYTHONPATH."""
    out = subprocess.run([sys.executable, "-c", "from citygen.distributed.ray_executor import code_fingerprint, "
                          "code_roots; import json; print(json.dumps([code_fingerprint(), code_roots()]))"],
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True)
    fp, roots = json.loads(out.stdout)
    return fp, roots


def test_code_fingerprint_follows_the_sources_not_their_folder(tmp_path):
    from citygen.distributed.ray_executor import code_fingerprint

    same = copy_code(tmp_path / "same")
    edited = copy_code(tmp_path / "edited")
    with open(edited / "citygen" / "distributed" / "toy_job.py", "a") as f:
        f.write("# one more line\n")
    assert fingerprint_in(same) == (code_fingerprint(), [str(same.resolve())])
    fp, roots = fingerprint_in(edited)
    assert fp != code_fingerprint() and roots == [str(edited.resolve())]


def test_ray_refuses_a_node_with_other_code(tmp_path, ray_local, monkeypatch):
    from citygen.distributed import ray_executor
    from citygen.distributed.ray_executor import CodeMismatchError, _ray_block_attempt

    tasks = toy_tasks(tmp_path / "tile", ["a"])
    # The driver's code differs from what the node imports (the node reports the real one).
    monkeypatch.setattr(ray_executor, "code_fingerprint", lambda: "0" * 16)
    with pytest.raises(CitygenError, match=r"Ray node .* imports other citygen code \(\w+ from .*\) than this "
                                           r"driver \(0{16} from"):
        RayExecutor().execute(tasks)
    assert not (tmp_path / "tile" / "a").exists()  # refused before any block started
    monkeypatch.undo()
    # A node that joins later is caught by the attempt itself, before it touches the block.
    with pytest.raises(CodeMismatchError, match="imports citygen code .* the driver's is 0{16}"):
        _ray_block_attempt(tasks[0].to_dict(), 0.0, "0" * 16)
    assert not (tmp_path / "tile" / "a").exists()


def test_ray_tasks_import_the_drivers_code_not_the_working_directorys(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'citygen[ray]')")
    # A driver whose working directory holds another citygen: Ray puts that folder first on
    # every worker's sys.path.  The executor's tasks import the driver's code all the same; a
    # caller's own runtime_env leaves the import order to Ray, and the code check catches it.
    other = copy_code(tmp_path / "other")
    with open(other / "citygen" / "distributed" / "toy_job.py", "a") as f:
        f.write("# another version\n")
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import json, sys
        import ray
        from citygen.distributed import BlockTask, RayExecutor
        from citygen.errors import CitygenError
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        def task(b):
            return BlockTask(b, f"{sys.argv[1]}/{b}", "citygen.distributed.toy_job:toy_block_job", {"steps": 2})
        out = {"default": RayExecutor().execute([task("a")])["a"].state}
        try:  # its own worker pool (another runtime env), so no worker of the first run is reused
            RayExecutor(runtime_env={"env_vars": {"CITYGEN_TEST": "1"}}).execute([task("b")])
            out["own_env"] = "ran"
        except CitygenError as err:
            out["own_env"] = str(err)
        print(json.dumps(out))
    """))
    run = subprocess.run([sys.executable, str(driver), str(tmp_path / "tile")], cwd=other, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["default"] == "done"
    assert "imports other citygen code" in out["own_env"] and f"from {other.resolve()})" in out["own_env"]
    assert not (tmp_path / "tile" / "b").exists()


# ---------------------------------------------------------------------------- data parallel in a block


def test_local_executor_data_parallel_block_survives_sigkill(tmp_path):
    pytest.importorskip("torch.distributed", reason="torch without torch.distributed")
    tile = tmp_path / "tile"
    tasks = toy_tasks(tile, ["d0"], d0={"data_parallel": True, "step_seconds": 0.1})
    killer = Killer(tile / "d0", tile)  # kills rank 0; the executor must stop rank 1 and retry both
    killer.start()
    result = run_tile(tasks, LocalExecutor(gpus=0, procs_per_block=2), tile)
    killer.join()

    # Each rank computes only its half of the vector: the result is right only if both took part.
    assert result.ok and result.blocks["d0"].result == reference_result(tmp_path, "d0")
    check_killed_block_resumed(killer, tile, "d0")
    assert [a["world_size"] for a in json.loads((tile / "d0" / ATTEMPTS_LOG).read_text())] == [2, 2]
    assert (tile / "d0" / "worker.rank1.log").is_file()
