"""Training a tile's blocks: one interface, two executors, fault tolerance and tile state.

::

    tasks = [BlockTask(block_id, out_dir, "citygen.train.block:train_block", {"config": ...}), ...]
    result = run_tile(tasks, LocalExecutor(), tile_dir)      # or RayExecutor(address="auto")
    result.raise_for_failures()
    tile_status(tile_dir)                                     # any time, from any process
    # $ citygen status TILE_DIR [--json]

**The block job contract.**  A block job is an importable function named by a dotted path
``"module:function"``, called as ``fn(block_id: str, out_dir: str, resume: bool, **kwargs)``
in a worker process, returning a JSON-serializable ``dict`` (stored as
``out_dir/result.json``).  It must:

- checkpoint into ``out_dir`` on its own, atomically (safetensors + JSON, via
  ``survey_io.atomic``), and may call :func:`report_progress` (``out_dir, step``) after each
  checkpoint so the tile's status shows its progress;
- when called with ``resume=True``, continue from its last checkpoint if one exists (and start
  fresh if none does); ``resume`` is True for every attempt after a block's first;
- be idempotent once finished (calling it again with ``resume=True`` returns the same result
  without training again);
- raise an exception for failure: the attempt is recorded as failed with
  ``"ExcType: message"`` and retried up to the executor's ``max_retries``.

Only the job's ``kwargs`` and the returned dict cross process boundaries, as JSON.  The
executors manage ``out_dir/state.json`` (see :mod:`citygen.distributed.state`), a worker
log (``worker.log``, local executor), ``result.json`` and the block's lock and lease
(``.block.lock``, ``lease.json``: one process trains a block at a time, see
:mod:`citygen.distributed.lease`); the job owns every other file in ``out_dir``.  A block that is ``done`` with a result file is never run again; delete its
folder to retrain it.  :mod:`citygen.distributed.toy_job` is a reference job.

**Executors.**  :class:`LocalExecutor` runs each attempt as a worker subprocess (one block
per visible GPU, or one at a time / ``max_parallel`` on CPU); :class:`RayExecutor` runs one
Ray task per block (one GPU per task on GPU clusters).  Both retry worker deaths and job
errors within ``1 + max_retries`` attempts per block, resuming from the last checkpoint.
Any object with ``execute(tasks) -> {block_id: BlockOutcome}`` is an executor.

**Data parallel inside a block** (optional): ``LocalExecutor(procs_per_block=k)`` starts k
ranks per block with the torch.distributed environment; a job that supports it calls
:func:`init_block_process_group` and writes checkpoints and its result from rank 0 only
(see :mod:`citygen.distributed.ddp`).  The Ray executor runs one process per block.
"""

from .ddp import init_block_process_group, is_main_rank
from .lease import BlockHeldError, hold_block
from .local import LocalExecutor
from .ray_executor import RayExecutor
from .state import is_finished, read_result, read_state, report_progress
from .task import BlockTask
from .tile import BlockOutcome, Executor, TileResult, run_tile, tile_status

__all__ = [
    "BlockHeldError", "BlockOutcome", "BlockTask", "Executor", "LocalExecutor", "RayExecutor", "TileResult",
    "hold_block", "init_block_process_group", "is_finished", "is_main_rank", "read_result", "read_state",
    "report_progress", "run_tile", "tile_status",
]
