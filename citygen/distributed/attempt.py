"""One attempt at one block, run inside whatever process the executor chose.

Both executors end up here: the local executor's worker subprocess and the Ray task call
:func:`run_attempt`.  It owns the block's state transitions during the attempt
(running -> done | failed); the executor only writes state when the worker could not
(it was killed, or never started).  The attempt holds the block
(:func:`citygen.distributed.lease.hold_block`) from before its first look at the block's
files until after its last write, so no two processes ever train one block.
"""

from __future__ import annotations

import json
import os
import traceback

from survey_io.atomic import atomic_write_json

from .lease import hold_block
from .state import (
    DONE,
    FAILED,
    RESULT_FILE,
    RUNNING,
    is_finished,
    read_result,
    read_state,
    this_host,
    update_state,
    utc_now,
)
from .task import BlockTask, resolve_job


class BlockJobError(RuntimeError):
    """The block job raised (or returned something that is not a JSON object)."""


def describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def run_attempt(task: BlockTask, resume: bool | None = None, hold_wait_s: float = 0.0) -> dict:
    """Run ``task``'s job once in this process and return its result.

    A block that already finished is not run again: its stored result is returned.  The
    job is asked to resume (``resume=True``) whenever an earlier attempt has started
    (unless the caller decided ``resume`` already), so a retry after a crash continues
    from the job's last checkpoint.  The block is held for the whole attempt; another
    holder is waited for up to ``hold_wait_s`` seconds.

    Raises:
        BlockHeldError: another live process holds the block (nothing was written).
        BlockJobError: the job failed; the block's state says ``failed`` with the error.
    """
    out_dir = task.path
    with hold_block(out_dir, wait_s=hold_wait_s, role=f"block {task.block_id} attempt"):
        if is_finished(out_dir):
            return read_result(out_dir)
        previous = read_state(out_dir) or {}
        earlier_attempts = int(previous.get("attempts", 0))
        if resume is None:
            resume = earlier_attempts > 0
        update_state(out_dir, block_id=task.block_id, state=RUNNING, attempts=earlier_attempts + 1,
                     pid=os.getpid(), host=this_host(), started=utc_now(), resumed=resume)
        try:
            job = resolve_job(task.job)
            result = job(task.block_id, str(out_dir), resume, **task.kwargs)
            if not isinstance(result, dict):
                raise TypeError(f"block job returned {type(result).__name__}, expected a dict")
            json.dumps(result)  # fail here, not half-way through writing the result file
        except Exception as err:
            message = describe_error(err)
            traceback.print_exc()
            update_state(out_dir, state=FAILED, error=message)
            raise BlockJobError(f"block {task.block_id}: {message}") from err
        atomic_write_json(out_dir / RESULT_FILE, result)
        update_state(out_dir, state=DONE, error=None, finished=utc_now())
        return result


def run_follower_rank(task: BlockTask, resume: bool) -> None:
    """Run a data-parallel rank other than 0: the job only, no state, no result.

    Rank 0 (:func:`run_attempt`) owns the block's files; the job itself must not write
    checkpoints from the other ranks (see :mod:`citygen.distributed.ddp`).
    """
    try:
        resolve_job(task.job)(task.block_id, str(task.path), resume, **task.kwargs)
    except Exception as err:
        traceback.print_exc()
        raise BlockJobError(f"block {task.block_id}: {describe_error(err)}") from err
