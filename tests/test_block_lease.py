"""One owner per block: the block lock and lease, workers that die with their executor,
orphans, refusals, and the cleanup of temp files left by killed writes.

Real processes throughout (SIGKILL cannot be faked); the workload is the toy block job,
whose per-step log (step, pid) shows which process trained which step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from citygen.cli import entrypoint
from citygen.distributed import BlockTask, LocalExecutor, read_state, run_tile, tile_status
from citygen.distributed.attempt import run_attempt
from citygen.distributed.lease import LEASE_FILE, BlockHeldError, is_held, read_lease
from citygen.distributed.state import process_alive, this_host, truncate_metrics
from citygen.distributed.toy_job import ATTEMPTS_LOG, CHECKPOINT, METRICS_LOG, toy_block_job
from survey_io.atomic import temp_files

ROOT = Path(__file__).resolve().parents[1]
TOY = "citygen.distributed.toy_job:toy_block_job"
STEPS = 20


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=kwargs.pop("env", env()), **kwargs)


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):
    """Poll until ``predicate()`` is truthy (a liveness wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def reference(tmp_path: Path, block_id: str) -> dict:
    return toy_block_job(block_id, str(tmp_path / "reference" / block_id), False, steps=STEPS, step_seconds=0)


def hold_in_subprocess(out_dir: Path, extra_env: dict | None = None) -> subprocess.Popen:
    """A process that holds ``out_dir``'s block until it is killed; returns once it holds."""
    proc = python(f"""
        import sys, time
        from citygen.distributed.lease import hold_block
        with hold_block({str(out_dir)!r}, role="test holder"):
            print("holding", flush=True)
            time.sleep(600)
    """, stdout=subprocess.PIPE, env={**env(), **(extra_env or {})})
    assert proc.stdout.readline().strip() == b"holding"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def steps_and_pids(block_dir: Path) -> tuple[list[int], list[int]]:
    lines = [json.loads(ln) for ln in (block_dir / METRICS_LOG).read_text().splitlines()]
    return [ln["step"] for ln in lines], [ln["pid"] for ln in lines]


# ---------------------------------------------------------------------------- kill -9 of the executor


DRIVER = """
    import sys
    from citygen.distributed import BlockTask, LocalExecutor, run_tile
    tile = sys.argv[1]
    tasks = [BlockTask(b, f"{tile}/{b}", "citygen.distributed.toy_job:toy_block_job",
                       {"steps": 20, "step_seconds": 0.1}) for b in ("b0", "b1")]
    result = run_tile(tasks, LocalExecutor(gpus=0, max_parallel=1), tile)
    result.raise_for_failures()
"""


def test_killed_executor_takes_its_worker_along_and_the_rerun_trains_each_block_once(tmp_path):
    tile = tmp_path / "tile"
    cmd = [sys.executable, "-c", textwrap.dedent(DRIVER), str(tile)]
    driver = subprocess.Popen(cmd, env=env())

    def b0_past_step_3():
        state = read_state(tile / "b0") if (tile / "b0" / "state.json").exists() else None
        return state if state and state.get("last_checkpoint_step", 0) >= 3 else None

    state = wait_for(b0_past_step_3, what="b0 to pass step 3")
    worker = int(state["pid"])
    assert worker != driver.pid and is_held(tile / "b0")
    lease = read_lease(tile / "b0")
    assert lease["pid"] == worker and lease["executor_pid"] == driver.pid and lease["host"] == this_host()

    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # (the lock goes with the worker's last thread, a moment after its main thread shows as dead)
    wait_for(lambda: not process_alive(worker) and not is_held(tile / "b0"), 30,
             "the orphaned worker to die with its executor and let go of its block")
    killed_at = steps_and_pids(tile / "b0")[0][-1]
    assert killed_at < STEPS

    # The same command again: b0 resumes in one new worker, b1 trains once, nothing runs twice.
    owners: dict[str, set] = {"b0": set(), "b1": set()}
    stop = threading.Event()

    def watch() -> None:  # which live attempts hold each block, sampled while the rerun runs
        while not stop.is_set():
            for b in owners:
                lease = read_lease(tile / b)
                if lease and "attempt" in lease["role"] and is_held(tile / b) and process_alive(lease["pid"]):
                    owners[b].add(lease["pid"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert subprocess.run(cmd, env=env()).returncode == 0
    stop.set()
    watcher.join()

    for b in ("b0", "b1"):
        block = tile / b
        assert json.loads((block / "result.json").read_text()) == reference(tmp_path, b)
        steps, pids = steps_and_pids(block)
        assert steps == list(range(1, STEPS + 1))  # monotonic, each step once, finished once
        starts = json.loads((block / ATTEMPTS_LOG).read_text())
        # one trainer at a time: each attempt's steps are one contiguous run, handed over at
        # the step the next attempt resumed from
        expected = []
        for k, attempt in enumerate(starts):
            end = starts[k + 1]["start_step"] if k + 1 < len(starts) else STEPS
            expected += [attempt["pid"]] * (end - attempt["start_step"])
        assert pids == expected
        assert owners[b] == {starts[-1]["pid"]}  # this run's one attempt held it, nobody else
        assert not (block / LEASE_FILE).exists() and not is_held(block)
    b0 = json.loads((tile / "b0" / ATTEMPTS_LOG).read_text())
    assert [a["pid"] for a in b0][0] == worker and len(b0) == 2 and 1 <= b0[1]["start_step"] <= killed_at
    assert len(json.loads((tile / "b1" / ATTEMPTS_LOG).read_text())) == 1
    assert read_state(tile / "b0")["attempts"] == 2 and read_state(tile / "b1")["attempts"] == 1
    assert temp_files(tile) == []


# ---------------------------------------------------------------------------- a live holder


def test_a_held_block_is_refused_with_its_holder_and_trained_once_it_is_free(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    tile = tmp_path / "tile"
    task = BlockTask("b", str(tile / "b"), TOY, {"steps": 3, "step_seconds": 0})
    helper = hold_in_subprocess(tile / "b")
    try:
        started = read_lease(tile / "b")["started"]
        held = f"held by pid {helper.pid} on host {this_host()} since {started}"

        # a rerun of the tile: refused at once, the other files left to the holder
        result = run_tile([task], LocalExecutor(gpus=0), tile)
        assert result.failed == ["b"] and result.blocks["b"].error == held
        assert not (tile / "b" / "state.json").exists() and not (tile / "b" / ATTEMPTS_LOG).exists()
        # an executor's attempt (its worker) and an in-process attempt: refused too, no retry
        outcome = LocalExecutor(gpus=0, hold_wait_s=0.2).execute([task])["b"]
        assert outcome.state == "failed" and outcome.error == held and outcome.attempts == 0
        assert "held by pid" in (tile / "b" / "worker.log").read_text()
        with pytest.raises(BlockHeldError, match=re.escape(held)):
            run_attempt(task, hold_wait_s=0.2)
        assert not (tile / "b" / "state.json").exists() and not (tile / "b" / ATTEMPTS_LOG).exists()

        # status: running, with its holder
        status = tile_status(tile)
        row = status["blocks"][0]
        assert row["state"] == "running" and row["alive"] is True and row["pid"] == helper.pid
        assert row["holder"]["started"] == started and status["counts"]["running"] == 1
        assert entrypoint(["status", str(tile)]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if "│ b " in ln)
        assert "running" in line and "(held, heartbeat" in line and str(helper.pid) in line

        # a run that may wait gets the block once the holder dies
        killer = threading.Timer(1.5, kill, [helper])
        killer.start()
        waited = run_tile([task], LocalExecutor(gpus=0), tile, wait_held_s=60)
        killer.join()
    finally:
        kill(helper)
    assert waited.ok and waited.blocks["b"].attempts == 1
    assert steps_and_pids(tile / "b")[0] == [1, 2, 3]
    assert not (tile / "b" / LEASE_FILE).exists() and tile_status(tile)["blocks"][0].get("holder") is None


def test_citygen_train_refuses_a_held_run_folder(tmp_path, capsys):
    from boxscene import make_box_survey

    data = make_box_survey(tmp_path / "data", n_train=2, n_test=0, width=8, height=6)
    out = tmp_path / "run"
    helper = hold_in_subprocess(out)
    try:
        code = entrypoint(["train", "--data", str(data), "--out", str(out), "--steps", "2", "--no-eval",
                           "--no-progress"])
    finally:
        kill(helper)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == f"citygen: error: {out}: held by pid {helper.pid} on host {this_host()} since " \
                  f"{read_lease(out)['started']}"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_an_orphaned_worker_is_stopped_and_its_block_trained(tmp_path):
    # An "executor" that starts a worker holding the block, then dies without taking it along
    # (as on a platform without the parent-death signal, before the watchdog fires).
    tile = tmp_path / "tile"
    holder_code = textwrap.dedent(f"""
        import time
        from citygen.distributed.lease import hold_block
        with hold_block({str(tile / 'b')!r}):
            print("holding", flush=True)
            time.sleep(600)
    """)
    executor = python(f"""
        import os, subprocess, sys
        env = dict(os.environ, CITYGEN_EXECUTOR_PID=str(os.getpid()))
        worker = subprocess.Popen([sys.executable, "-c", {holder_code!r}], env=env, stdout=subprocess.PIPE,
                                  start_new_session=True)
        assert worker.stdout.readline().strip() == b"holding"
        print(worker.pid, flush=True)
    """, stdout=subprocess.PIPE)
    orphan = int(executor.stdout.readline())
    executor.wait()
    lease = read_lease(tile / "b")
    assert lease["pid"] == orphan and lease["executor_pid"] == executor.pid and is_held(tile / "b")

    task = BlockTask("b", str(tile / "b"), TOY, {"steps": 3, "step_seconds": 0})
    result = run_tile([task], LocalExecutor(gpus=0), tile)
    assert result.ok and result.blocks["b"].result == toy_block_job("b", str(tmp_path / "ref"), False, steps=3,
                                                                    step_seconds=0)
    assert not process_alive(orphan)


# ---------------------------------------------------------------------------- stale temp files


def test_temp_files_of_killed_writes_are_removed_when_the_block_is_next_held(tmp_path):
    block = tmp_path / "b"
    (block / "checkpoints").mkdir(parents=True)
    # A checkpoint write killed half-way (the process dies inside atomic_path).
    dead = python(f"""
        import os, signal
        from survey_io.atomic import atomic_path
        with atomic_path({str(block / CHECKPOINT)!r}) as tmp:
            tmp.write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert dead.wait() == -signal.SIGKILL
    # A write still in progress in a live process (not the block's holder: it must be kept anyway).
    live = python(f"""
        import time
        from survey_io.atomic import atomic_path
        with atomic_path({str(block / "checkpoints" / "notes.json")!r}) as tmp:
            tmp.write_text("{{}}")
            print("writing", flush=True)
            time.sleep(600)
    """, stdout=subprocess.PIPE)
    try:
        assert live.stdout.readline().strip() == b"writing"
        legacy = block / "checkpoints" / ".step_0000010.safetensors.k3x_9a2q.safetensors"  # before pids
        legacy.write_bytes(b"y" * 100)
        unrelated = block / "checkpoints" / ".keep.me"
        unrelated.write_text("not a temp file")
        found = {p.name: pid for p, pid in temp_files(block)}
        killed = next(n for n in found if n.startswith(f".{CHECKPOINT}.tmp-{dead.pid}-"))
        kept = next(n for n in found if n.startswith(f".notes.json.tmp-{live.pid}-"))
        assert found == {killed: dead.pid, kept: live.pid, legacy.name: None}

        task = BlockTask("b", str(block), TOY, {"steps": 2, "step_seconds": 0})
        assert run_attempt(task) == toy_block_job("b", str(tmp_path / "ref"), False, steps=2, step_seconds=0)
        assert [(p.name, pid) for p, pid in temp_files(block)] == [(kept, live.pid)]
        assert unrelated.read_text() == "not a temp file"
    finally:
        kill(live)


def test_a_resumed_metrics_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (50, 100, 150, 200))
                   + '{"step": 25')  # a line torn by the kill
    truncate_metrics(log, 100)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [50, 100]
    truncate_metrics(log, 0)  # a fresh start keeps nothing
    assert log.read_text() == ""
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------------------- holders on other hosts


def foreign_lease(age_s: float) -> dict:
    """A lease written on another host whose last heartbeat is ``age_s`` seconds old."""
    from datetime import datetime, timedelta, timezone

    beat = (datetime.now(timezone.utc) - timedelta(seconds=age_s)).isoformat(timespec="milliseconds")
    return {"pid": 4242, "host": "another-node", "started": beat, "heartbeat": beat, "role": "test", "pid_start": 1}


def test_a_fresh_lease_from_another_host_holds_the_block_and_a_stale_one_is_taken_over(tmp_path):
    from citygen.distributed.lease import LEASE_STALE_S, hold_block, holder

    block = tmp_path / "b"
    block.mkdir()
    # A file system whose flock does not reach across nodes: only the lease shows the holder.
    (block / LEASE_FILE).write_text(json.dumps(foreign_lease(LEASE_STALE_S - 20)))
    assert holder(block)["host"] == "another-node"
    with pytest.raises(BlockHeldError, match="held by pid 4242 on host another-node"):
        with hold_block(block, wait_s=0.3):
            pass
    assert read_lease(block)["host"] == "another-node"  # refused without touching it

    (block / LEASE_FILE).write_text(json.dumps(foreign_lease(LEASE_STALE_S + 5)))  # its node went silent
    assert holder(block) is None
    with hold_block(block) as lease:
        assert lease["pid"] == os.getpid() and read_lease(block)["pid"] == os.getpid()
    assert not (block / LEASE_FILE).exists()


def test_a_holder_whose_lease_was_taken_over_exits_before_it_writes_again(tmp_path):
    from citygen.distributed.lease import EXIT_LEASE_LOST

    block = tmp_path / "b"
    proc = python(f"""
        import os, time
        from pathlib import Path
        from citygen.distributed import lease
        lease.HEARTBEAT_S = 0.1
        with lease.hold_block({str(block)!r}):
            print("holding", flush=True)
            for i in range(600):  # a trainer writing a file a step (whole: the exit may come mid-write)
                (Path({str(block)!r}) / "written.tmp").write_text(str(i))
                os.replace(Path({str(block)!r}) / "written.tmp", Path({str(block)!r}) / "written")
                time.sleep(0.05)
    """, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"holding"
        # Another node declared it dead and took the block over (it sees no cross-node flock).
        (block / LEASE_FILE).write_text(json.dumps(foreign_lease(0)))
        assert proc.wait(timeout=25) == EXIT_LEASE_LOST  # long before its 30 s of writes were done
    finally:
        if proc.poll() is None:
            kill(proc)
    assert b"lost the block to pid 4242 on host another-node" in proc.stderr.read()
    assert int((block / "written").read_text()) < 599
    assert read_lease(block)["host"] == "another-node"  # the new holder's lease left as it was
