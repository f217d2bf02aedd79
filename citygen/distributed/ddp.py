"""torch.distributed data parallel inside one block (optional; LocalExecutor(procs_per_block=k)).

A block job that supports it calls :func:`init_block_process_group` first.  Every rank
trains on its share of the rays and averages gradients (``torch.nn.parallel.
DistributedDataParallel`` or an explicit all-reduce); only the main rank writes
checkpoints, calls ``report_progress`` and returns the result that is kept.  On resume
every rank loads the main rank's last checkpoint.  Run without the executor's
environment (no WORLD_SIZE), the job is simply single-process.
"""

from __future__ import annotations

import os
from datetime import timedelta


def world() -> tuple[int, int]:
    """(rank, world size) from the environment the executor sets; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return world()[0] == 0


def init_block_process_group(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the block's process group (NCCL on GPUs, gloo on CPU) and return (rank, world).

    Each rank uses GPU ``LOCAL_RANK`` of the block's GPUs.  A no-op for a single process.
    """
    rank, size = world()
    if size == 1:
        return rank, size
    # deferred: citygen.distributed imports no torch (3 s), so `citygen status` and the executor's parent start without it
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return rank, size
