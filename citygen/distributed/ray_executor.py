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
runs) waits up to ``hold_wait_s`` and then fails as held, without further retries.  A node
that dies outright (machine lost, raylet killed) fails its task with a node-died error; Ray
retries it on another node, and the retry takes the block over once the dead holder's lock
is gone (same host, or a file system that carries ``flock``) or its lease has gone stale
(:data:`~citygen.distributed.lease.LEASE_STALE_S`, other file systems).

**The same code on every node.**  A Ray worker imports a task's function by name, so each
node would import *its* citygen: the one on the ``PYTHONPATH`` of its ``ray start``, the one
installed there, or a citygen in the driver's working directory, which Ray puts first on
every worker's ``sys.path`` without a word.  The executor therefore (1) ships its tasks by
value (:func:`_in_code_roots`): they put the folders the driver imports citygen, survey_io
and cuda_ext from first on ``sys.path`` where those folders exist on the node (a checkout on
a shared file system serves every node), then import citygen; with a ``runtime_env`` of the
caller's (e.g. Ray's ``py_modules``) the node's own import order is left alone; and (2)
before any block starts, asks every live node for a fingerprint of the code it imports
(:func:`code_fingerprint`, a hash of the three packages' sources) and refuses to run when one
differs from the driver's or cannot import citygen; each attempt checks again (a node that
joined later) and fails without a retry when it differs.

Ray is an optional dependency (``pip install citygen[ray]``), imported only when used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
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


#: the packages a block job runs on: every node must import the same code as the driver.
CODE_PACKAGES = ("citygen", "survey_io", "cuda_ext")
_SOURCE_SUFFIXES = {".py", ".yaml", ".cu", ".cuh", ".cpp", ".h"}
#: how long the check of every node's code may take (each node starts a worker for it).
PROBE_TIMEOUT_S = 300.0


class CodeMismatchError(CitygenError):
    """A Ray node imports citygen code other than the driver's."""

    def __reduce__(self):  # Ray ships exceptions between processes
        return CodeMismatchError, (self.path, self.reason)


def code_roots() -> list[str]:
    """The folders this process imports :data:`CODE_PACKAGES` from (their parents), in order."""
    roots: list[str] = []
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            root = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
            if root not in roots:
                roots.append(root)
    return roots


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the sources of :data:`CODE_PACKAGES` as this process imports them (paths
    relative to each package, so two checkouts of one commit agree wherever they are)."""
    digest = hashlib.sha256()
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            digest.update(f"{name}: missing\0".encode())
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*")):
            if path.suffix in _SOURCE_SUFFIXES and "__pycache__" not in path.parts and path.is_file():
                digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _ray_block_attempt(task: dict, hold_wait_s: float = 0.0, fingerprint: str | None = None) -> dict:
    """Body of a block's Ray task (called by name through :func:`_in_code_roots`)."""
    if fingerprint is not None and code_fingerprint() != fingerprint:
        raise CodeMismatchError(None, f"this node ({os.uname().nodename}) imports citygen code {code_fingerprint()} "
                                      f"from {os.pathsep.join(code_roots())}, the driver's is {fingerprint}")
    return run_attempt(BlockTask.from_dict(task), hold_wait_s=hold_wait_s)


def _probe() -> dict:
    """What a node answers the code check (run through :func:`_in_code_roots`)."""
    return {"host": os.uname().nodename, "fingerprint": code_fingerprint(), "roots": code_roots()}


def _in_code_roots() -> Any:
    """The function every task of the executor runs: ``run(roots, name, *args)`` puts ``roots``
    first on ``sys.path`` (those that exist here), then calls ``citygen.distributed.ray_executor.<name>``.

    Nested, so that Ray ships it by value: it runs before anything imports citygen on the
    worker, and where citygen cannot be imported at all (the probe then reports the error).
    """

    def run(roots: list[str] | None, name: str, *args: Any) -> Any:
        # deferred: shipped by value, the function takes nothing from this module's globals
        import importlib
        import os
        import sys

        for root in reversed(roots or []):
            # an installed citygen (site-packages) is the node's own business: moving that
            # folder first would also reorder every other package
            if os.path.isdir(root) and os.path.basename(root) not in ("site-packages", "dist-packages"):
                while root in sys.path:
                    sys.path.remove(root)
                sys.path.insert(0, root)
        try:
            module = importlib.import_module("citygen.distributed.ray_executor")
            fn = getattr(module, name)
        except Exception as err:  # an import failure, or a citygen without this function
            if name != "_probe":
                raise
            where = getattr(sys.modules.get("citygen"), "__file__", None)
            return {"host": os.uname().nodename, "error": f"{type(err).__name__}: {err}"
                                                           + (f" (citygen from {where})" if where else "")}
        return fn(*args)

    return run


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
        runtime_env: the Ray runtime environment of the tasks (e.g. ``{"py_modules": [...]}``).
            Default: none, and tasks import citygen from the driver's folders where a node has
            them (see the module docstring).
        check_code: refuse to run when a node imports other citygen code than the driver.
    """

    def __init__(self, address: str | None = None, num_gpus_per_task: float | None = None,
                 num_cpus_per_task: float = 1, max_retries: int = 2, init_kwargs: dict | None = None,
                 hold_wait_s: float = 60.0, runtime_env: dict | None = None, check_code: bool = True):
        if max_retries < 0:
            raise CitygenError(None, f"max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.num_gpus_per_task = num_gpus_per_task
        self.num_cpus_per_task = num_cpus_per_task
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self.hold_wait_s = hold_wait_s
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        # where tasks import citygen from: the driver's folders, unless the caller's runtime_env says
        self.code_roots = code_roots() if runtime_env is None else None
        self.check_code = check_code

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
        fingerprint = self._check_nodes(ray) if self.check_code else None
        remote = ray.remote(_in_code_roots())
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
                                 retry_exceptions=False, name=f"block:{task.block_id}",
                                 **self._env()).remote(self.code_roots, "_ray_block_attempt", task.to_dict(),
                                                       self.hold_wait_s, fingerprint)
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
                    if isinstance(getattr(err, "cause", None), (BlockHeldError, CodeMismatchError)):
                        # Another process trains the block, or this node runs other code: no
                        # retry, and the block's state is not ours to write.
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


    def _env(self) -> dict:
        return {} if self.runtime_env is None else {"runtime_env": self.runtime_env}

    def _check_nodes(self, ray: Any) -> str:
        """Every live node imports the driver's citygen code; returns its fingerprint.

        Raises:
            CitygenError: a node cannot import citygen or imports other code (one line per run).
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ours = code_fingerprint()
        probe = ray.remote(_in_code_roots())
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [probe.options(num_cpus=0, name="citygen:code-probe", max_retries=0, **self._env(),
                              scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(self.code_roots, "_probe") for n in nodes]
        try:
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise CitygenError(None, f"the Ray nodes did not report their citygen code within {PROBE_TIMEOUT_S:.0f} s") \
                from None
        except ray.exceptions.RayError as err:  # a node died under the probe, say
            first = str(err).splitlines()[0] if str(err) else ""
            raise CitygenError(None, f"the check of the Ray nodes' citygen code failed: {type(err).__name__}: {first}") \
                from None
        for node, answer in zip(nodes, answers):
            where = f"Ray node {node.get('NodeManagerAddress')} ({answer['host']})"
            if "error" in answer:
                raise CitygenError(None, f"{where} cannot import citygen ({answer['error']}): install the driver's "
                                         "citygen there or put it on a path every node sees (README: Ray cluster)")
            if answer["fingerprint"] != ours:
                raise CitygenError(None, f"{where} imports other citygen code ({answer['fingerprint']} from "
                                         f"{os.pathsep.join(answer['roots'])}) than this driver ({ours} from "
                                         f"{os.pathsep.join(code_roots())}): run one version on every node")
        return ours


def _attempts(task: BlockTask) -> int:
    return int((read_state(task.path) or {}).get("attempts", 0))
