"""The Ray executor: one Ray task per block, for a cluster (or a local Ray instance).

Each block attempt is a Ray task that asks for ``num_gpus_per_task`` GPUs (Ray sets the
task's CUDA_VISIBLE_DEVICES) and runs :func:`citygen.distributed.attempt.run_attempt`.
Two kinds of failure are retried within one budget of ``1 + max_retries`` attempts per
block: the worker dying (node lost, OOM kill, SIGKILL) is retried by Ray itself
(``max_retries`` of the task), and the job raising is resubmitted here.  Either way the
retry resumes from the block's last checkpoint.  Block folders must be on a file system
that every node sees (and that supports ``flock`` across nodes, as NFSv4 and Lustre do, for
the block lock to keep two nodes apart).

Every attempt holds its block (:mod:`citygen.distributed.lease`): a retry that Ray starts
while the attempt it replaces still holds the block (a node that lost contact but still
runs) waits up to ``hold_wait_s`` and then fails as held, without further retries.

Ray is an optional dependency (``pip install citygen[ray]``), imported only when used.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import CitygenError
from .attempt import run_attempt
from .lease import BlockHeldError
from .state import FAILED, read_state, update_state
from .task import BlockTask
from .tile import BlockOutcome, outcome_from_state


def import_ray() -> Any:
    """Import ray, or raise a CitygenError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise CitygenError(None, "the Ray executor needs ray: pip install 'citygen[ray]'") from None
    return ray


def _ray_block_attempt(task: dict, hold_wait_s: float = 0.0) -> dict:
    """Body of the Ray task (a module-level function, so workers import it by name)."""
    return run_attempt(BlockTask.from_dict(task), hold_wait_s=hold_wait_s)


class RayExecutor:
    """Run each block attempt as a Ray task.

    Args:
        address: Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ...); default a new
            local instance. When the caller has already called ``ray.init``, that Ray is used
            as is (and left running).
        num_gpus_per_task: GPUs per block. Default: 1 when the cluster has GPUs, else 0.
        num_cpus_per_task: CPUs per block.
        max_retries: retries after a failed attempt (worker death or job error).
        init_kwargs: extra ``ray.init`` arguments (e.g. ``num_cpus=2, include_dashboard=False``).
        hold_wait_s: how long an attempt waits for another process holding its block.
    """

    def __init__(self, address: str | None = None, num_gpus_per_task: float | None = None,
                 num_cpus_per_task: float = 1, max_retries: int = 2, init_kwargs: dict | None = None,
                 hold_wait_s: float = 60.0):
        if max_retries < 0:
            raise CitygenError(None, f"max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.num_gpus_per_task = num_gpus_per_task
        self.num_cpus_per_task = num_cpus_per_task
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self.hold_wait_s = hold_wait_s

    def execute(self, tasks: Sequence[BlockTask]) -> dict[str, BlockOutcome]:
        """Run every task to done or failed (see :class:`citygen.distributed.tile.Executor`)."""
        ray = import_ray()
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(address=self.address, **self.init_kwargs)
        try:
            return self._execute(ray, tasks)
        finally:
            if started_ray:
                ray.shutdown()

    def _execute(self, ray: Any, tasks: Sequence[BlockTask]) -> dict[str, BlockOutcome]:
        gpus = self.num_gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        remote = ray.remote(_ray_block_attempt)
        budget = 1 + self.max_retries
        # Attempts recorded in each block's state before this run: the rest is this run's.
        base = {t.block_id: _attempts(t) for t in tasks}
        submitted = {t.block_id: 0 for t in tasks}
        pending: dict[Any, BlockTask] = {}

        def used(task: BlockTask) -> int:
            # Ray's own retries show only in the state file; a submission that failed before
            # its attempt was recorded shows only in `submitted`.
            return max(_attempts(task) - base[task.block_id], submitted[task.block_id])

        def submit(task: BlockTask) -> None:
            left = budget - used(task)  # attempts still allowed
            submitted[task.block_id] += 1
            ref = remote.options(num_gpus=gpus, num_cpus=self.num_cpus_per_task, max_retries=left - 1,
                                 retry_exceptions=False, name=f"block:{task.block_id}").remote(task.to_dict(), self.hold_wait_s)
            pending[ref] = task

        for task in tasks:
            submit(task)
        outcomes: dict[str, BlockOutcome] = {}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready[0])
                try:
                    ray.get(ready[0])
                    outcomes[task.block_id] = outcome_from_state(task)
                except ray.exceptions.RayTaskError as err:
                    if isinstance(getattr(err, "cause", None), BlockHeldError):
                        # Another process trains the block: no retry, and its state is not ours.
                        state = read_state(task.path) or {}
                        outcomes[task.block_id] = BlockOutcome(task.block_id, FAILED, int(state.get("attempts", 0)),
                                                               error=err.cause.reason)
                        continue
                    # The job raised; run_attempt recorded the error in the block's state.
                    if used(task) < budget:
                        submit(task)
                    else:
                        outcomes[task.block_id] = outcome_from_state(task)
                except ray.exceptions.RayError as err:
                    # Ray gave up on the task (its workers kept dying, or it was cancelled).
                    error = f"ray task failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    update_state(task.path, state=FAILED, error=error)
                    outcomes[task.block_id] = outcome_from_state(task, error=error)
        finally:
            for ref in pending:  # interrupted: do not leave tasks running behind us
                ray.cancel(ref, force=True)
        return outcomes


def _attempts(task: BlockTask) -> int:
    return int((read_state(task.path) or {}).get("attempts", 0))
