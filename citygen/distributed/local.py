"""The local executor: each block attempt in its own worker process(es) on this machine.

One block per visible GPU (each worker sees only its GPU through CUDA_VISIBLE_DEVICES);
on a CPU-only machine one block at a time, or ``max_parallel`` at once with the cores
shared out between them.  Workers are plain subprocesses (``python -m
citygen.distributed.worker``) in their own session, so a crash or a SIGKILL takes down
only that block's attempt; the executor notices the exit and retries it, and the retry
resumes from the block's last checkpoint.  Workers die with the executor (see
:mod:`citygen.distributed.worker`); the executor stops their process groups when it
exits.  Each attempt holds its block (:mod:`citygen.distributed.lease`); a block another
live process holds fails as held, without retries.

With ``procs_per_block = k > 1`` a block trains data parallel: k ranks (one per GPU of
the block's k GPUs, or k CPU processes with gloo) get the torch.distributed environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the job joins them with
:func:`citygen.distributed.ddp.init_block_process_group`.  Rank 0 owns the block's state
and result; when any rank fails, the whole group is stopped and the block retried.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, Sequence

from ..errors import CitygenError
from .lease import EXECUTOR_PID_ENV, EXIT_HELD, BlockHeldError, read_lease
from .state import DONE, FAILED, PENDING, read_state, update_state
from .task import BlockTask
from .tile import BlockOutcome, outcome_from_state

WORKER_LOG = "worker.log"


def visible_gpu_count() -> int:
    """GPUs torch can see here (0 without torch or CUDA)."""
    try:
        # deferred: citygen.distributed imports no torch (3 s), so `citygen status` and the executor's parent start without it
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


@dataclass
class _Attempt:
    """A block attempt in flight: one worker process per rank (rank 0 first)."""

    task: BlockTask
    procs: list[subprocess.Popen]
    logs: list[IO[bytes]]

    def failed_rank(self) -> tuple[int, int] | None:
        """(rank, exit status) of the first rank that exited with an error, if any."""
        for rank, proc in enumerate(self.procs):
            rc = proc.poll()
            if rc not in (None, 0):
                return rank, rc
        return None

    def over(self) -> bool:
        """Rank 0 has exited (it owns the result; followers are then stopped) or a rank failed."""
        return self.procs[0].poll() is not None or self.failed_rank() is not None

    def stop(self) -> None:
        for proc in self.procs:
            _stop(proc)
        for log in self.logs:
            log.close()


class LocalExecutor:
    """Run block attempts as worker processes on this machine.

    Args:
        max_parallel: most blocks at once. Default: one per GPU (per ``procs_per_block``
            GPUs), or 1 on CPU.
        gpus: GPUs to use: a count (the first n visible) or a list of indices among the
            visible GPUs; 0 or [] forces CPU. Default: every GPU torch sees.
        max_retries: retries after a failed attempt (the job raised, or a worker died),
            so a block gets at most ``1 + max_retries`` attempts per run.
        procs_per_block: data-parallel ranks per block (see the module docstring); on GPUs,
            each rank gets one GPU of the block's group.
        poll_interval_s: how often worker processes are checked.
        hold_wait_s: how long an attempt waits for another process that holds its block
            before it fails as held (a retry's predecessor has exited already, so this
            only matters for a holder outside this executor).
    """

    def __init__(self, max_parallel: int | None = None, gpus: int | Sequence[int] | None = None,
                 max_retries: int = 2, procs_per_block: int = 1, poll_interval_s: float = 0.05,
                 hold_wait_s: float = 10.0):
        if max_parallel is not None and max_parallel < 1:
            raise CitygenError(None, f"max_parallel must be >= 1, got {max_parallel}")
        if max_retries < 0:
            raise CitygenError(None, f"max_retries must be >= 0, got {max_retries}")
        if procs_per_block < 1:
            raise CitygenError(None, f"procs_per_block must be >= 1, got {procs_per_block}")
        self.max_parallel = max_parallel
        self.gpus = gpus
        self.max_retries = max_retries
        self.procs_per_block = procs_per_block
        self.poll_interval_s = poll_interval_s
        self.hold_wait_s = hold_wait_s

    def devices(self) -> list[str]:
        """CUDA_VISIBLE_DEVICES names of the GPUs this executor uses ([] on CPU)."""
        visible = visible_gpu_count() if self.gpus != 0 and self.gpus != [] else 0
        if self.gpus is None:
            indices = list(range(visible))
        elif isinstance(self.gpus, int):
            if self.gpus > visible:
                raise CitygenError(None, f"asked for {self.gpus} GPUs, {visible} visible")
            indices = list(range(self.gpus))
        else:
            indices = list(self.gpus)
            bad = [i for i in indices if not 0 <= i < visible]
            if bad:
                raise CitygenError(None, f"GPU indices {bad} out of range ({visible} visible)")
        # Indices count among the GPUs visible to us; map them through our own
        # CUDA_VISIBLE_DEVICES so a worker sees the same physical device.
        parent = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [d.strip() for d in parent.split(",")] if parent else [str(i) for i in range(visible)]
        return [names[i] for i in indices]

    def slots(self) -> list[list[str]]:
        """The GPUs of each concurrent block (``[[]] * n`` on CPU)."""
        devices, k = self.devices(), self.procs_per_block
        if devices:
            groups = [devices[i:i + k] for i in range(0, len(devices) - k + 1, k)]
            if not groups:
                raise CitygenError(None, f"procs_per_block={k} needs {k} GPUs, {len(devices)} in use")
            return groups[: self.max_parallel]
        return [[] for _ in range(self.max_parallel or 1)]

    def execute(self, tasks: Sequence[BlockTask]) -> dict[str, BlockOutcome]:
        """Run every task to done or failed (see :class:`citygen.distributed.tile.Executor`)."""
        slots = self.slots()
        queue = deque(tasks)
        used = {t.block_id: 0 for t in tasks}
        running: dict[int, _Attempt] = {}
        outcomes: dict[str, BlockOutcome] = {}
        try:
            while queue or running:
                for slot, gpus in enumerate(slots):
                    if slot not in running and queue:
                        task = queue.popleft()
                        used[task.block_id] += 1
                        running[slot] = self._start(task, gpus, len(slots))
                time.sleep(self.poll_interval_s)
                for slot, attempt in list(running.items()):
                    if not attempt.over():
                        continue
                    failed = attempt.failed_rank()
                    del running[slot]
                    attempt.stop()  # the remaining ranks of a data-parallel group, if any
                    outcome = self._finish(attempt, failed, retry=used[attempt.task.block_id] <= self.max_retries)
                    if outcome is None:
                        queue.append(attempt.task)
                    else:
                        outcomes[attempt.task.block_id] = outcome
        finally:
            for attempt in running.values():  # interrupted: stop our workers, leave blocks resumable
                attempt.stop()
                update_state(attempt.task.path, state=PENDING, error="interrupted: the executor stopped")
        return outcomes

    def _start(self, task: BlockTask, gpus: list[str], n_slots: int) -> _Attempt:
        task.path.mkdir(parents=True, exist_ok=True)
        # Decided here, once, so that every rank agrees (see attempt.run_attempt).
        resume = int((read_state(task.path) or {}).get("attempts", 0)) > 0
        payload = json.dumps({"task": task.to_dict(), "resume": resume, "hold_wait_s": self.hold_wait_s}).encode()
        env = dict(os.environ)
        env[EXECUTOR_PID_ENV] = str(os.getpid())  # the worker dies with us (worker.die_with_parent)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        else:
            if self.gpus in (0, []):
                env["CUDA_VISIBLE_DEVICES"] = ""  # CPU forced on a GPU machine
            procs = n_slots * self.procs_per_block
            if procs > 1:  # share the cores instead of oversubscribing them
                threads = str(max(1, (os.cpu_count() or 1) // procs))
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    env.setdefault(var, threads)
        world = self.procs_per_block
        if world > 1:
            env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        attempt = _Attempt(task, [], [])
        for rank in range(world):
            if world > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank))
            log = open(task.path / (WORKER_LOG if rank == 0 else f"worker.rank{rank}.log"), "ab")
            proc = subprocess.Popen([sys.executable, "-m", "citygen.distributed.worker"], stdin=subprocess.PIPE,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            proc.stdin.write(payload)
            proc.stdin.close()
            attempt.procs.append(proc)
            attempt.logs.append(log)
        return attempt

    def _finish(self, attempt: _Attempt, failed: tuple[int, int] | None, retry: bool) -> BlockOutcome | None:
        """The outcome of an exited attempt, or None when the block goes back in the queue."""
        task = attempt.task
        outcome = outcome_from_state(task)
        if outcome.state == DONE:  # rank 0 finished the block, whatever the followers did after
            return outcome
        state = read_state(task.path) or {}
        if failed == (0, EXIT_HELD):  # another process trains the block: its state is not ours to write
            error = BlockHeldError(task.path, read_lease(task.path)).reason
            return BlockOutcome(task.block_id, FAILED, int(state.get("attempts", 0)), error=error)
        if failed is None:
            error = f"worker exited without finishing the block (see {task.path / WORKER_LOG})"
        elif failed[0] == 0 and state.get("state") == FAILED and state.get("pid") == attempt.procs[0].pid:
            error = state.get("error")  # the job raised; the worker recorded why
        else:
            rank = f"rank {failed[0]} " if len(attempt.procs) > 1 else ""
            error = f"{rank}{_describe_exit(failed[1])} (see {task.path / WORKER_LOG})"
        if retry:
            update_state(task.path, state=PENDING, error=error)
            return None
        update_state(task.path, state=FAILED, error=error)
        return outcome_from_state(task, error=error)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"worker process killed by {name}"
    return f"worker process exited with status {rc}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Terminate a worker's whole session (its own children too), then kill it."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
