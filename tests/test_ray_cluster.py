"""The Ray executor on a real multi-node cluster: a head and two worker nodes started with
``ray start`` as separate processes on this machine; one worker node is killed while it
trains a block, and every block still finishes exactly once.

"Exactly once" is read from files the toy job writes in each attempt (its per-step log with
the pid of the process that trained each step, and one appended line per attempt that
trained to the end), not from the executor's own bookkeeping.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from citygen.distributed import BlockTask, RayExecutor, read_state, run_tile, tile_status
from citygen.distributed.toy_job import ATTEMPTS_LOG, COMPLETIONS_LOG, METRICS_LOG, toy_block_job

pytest.importorskip("ray", reason="ray is not installed (pip install 'citygen[ray]')")
if shutil.which("ray") is None:
    pytest.skip("the ray command is not on PATH (pip install 'citygen[ray]')", allow_module_level=True)

from raycluster import LocalRayCluster  # noqa: E402  (needs ray)

TOY = "citygen.distributed.toy_job:toy_block_job"
STEPS = 20
KILL_AT_STEP = 5


@pytest.fixture
def cluster():
    c = LocalRayCluster(n_workers=2)
    yield c
    c.stop()
    assert c.processes() == [], "Ray processes left behind"


@pytest.mark.timeout(240)
def test_a_killed_worker_node_is_retried_elsewhere_and_every_block_finishes_once(tmp_path, cluster):
    tile = tmp_path / "tile"
    ids = ["b0", "b1", "b2", "b3"]
    # b1 steps slower so that the killer below cannot miss it running
    tasks = [BlockTask(b, str(tile / b), TOY, {"steps": STEPS, "step_seconds": 0.25 if b == "b1" else 0.1})
             for b in ids]
    killed: dict = {}

    def kill_the_node_running_b1() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = read_state(tile / "b1") if (tile / "b1").is_dir() else None
            if state and state["state"] == "running" and state.get("last_checkpoint_step", 0) >= KILL_AT_STEP:
                node = cluster.node_of_pid(state["pid"])
                if node is not None:
                    pids = cluster.node_tree(node)
                    cluster.kill_node(node)
                    killed.update(node=node, pid=state["pid"], pids=pids)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_node_running_b1, daemon=True)
    killer.start()
    result = run_tile(tasks, RayExecutor(address=cluster.address, max_retries=2), tile)
    killer.join()

    assert killed.get("node", "").startswith("worker"), "b1 was never seen running on a worker node"
    assert killed["pid"] in killed["pids"]  # the block's process really was on the node killed
    assert result.ok, result.failed
    for b in ids:
        reference = toy_block_job(b, str(tmp_path / "reference" / b), False, steps=STEPS, step_seconds=0)
        assert result.blocks[b].result == reference
        completions = [json.loads(line) for line in (tile / b / COMPLETIONS_LOG).read_text().splitlines()]
        assert len(completions) == 1 and completions[0]["step"] == STEPS  # trained to the end once
        steps = [json.loads(line) for line in (tile / b / METRICS_LOG).read_text().splitlines()]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))  # each step's line once, in order

    attempts = json.loads((tile / "b1" / ATTEMPTS_LOG).read_text())
    assert [a["pid"] for a in attempts][0] == killed["pid"] and len(attempts) == 2
    assert attempts[1]["pid"] not in killed["pids"]  # the retry ran on the surviving node
    assert attempts[1]["start_step"] >= KILL_AT_STEP  # resumed from its checkpoint
    # the steps the dead node trained, then the retry's: no step by both, none after the other
    pids = [s["pid"] for s in (json.loads(line) for line in (tile / "b1" / METRICS_LOG).read_text().splitlines())]
    first = attempts[1]["start_step"]
    assert pids == [killed["pid"]] * first + [attempts[1]["pid"]] * (STEPS - first)
    assert {b: o.attempts for b, o in result.blocks.items()} == {"b0": 1, "b1": 2, "b2": 1, "b3": 1}

    status = tile_status(tile)
    assert status["complete"] and status["counts"] == {"pending": 0, "running": 0, "done": 4, "failed": 0}
    assert not any((tile / b / "lease.json").exists() for b in ids)  # every holder let go
    assert all(not Path(f"/proc/{pid}").is_dir() or pid not in killed["pids"] for pid in killed["pids"])
