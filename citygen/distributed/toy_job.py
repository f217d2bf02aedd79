"""A synthetic block job for tests and benchmarks of the executors.

It "trains" a small float64 vector step by step with a deterministic update, writes a
checkpoint after every step (one safetensors file, step in its metadata, written
atomically) and resumes from it, so its result is bit-identical whether or not it was
interrupted.  It also keeps ``toy_attempts.json``: the step each attempt started from,
which lets tests see that a retry really resumed, and ``toy_metrics.jsonl``: one line per
step (``step``, ``pid``), truncated on resume like the trainer's ``metrics.jsonl``, which
shows whether two processes ever trained the block at once, and ``toy_completions.jsonl``:
one line (``pid``, ``step``) appended by each attempt that trains to the last step, so a
block trained to completion twice shows two lines whatever the executors recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from survey_io.atomic import atomic_path, atomic_write_json

from ..errors import CitygenError
from .ddp import init_block_process_group
from .state import report_progress, truncate_metrics

CHECKPOINT = "toy_checkpoint.safetensors"
ATTEMPTS_LOG = "toy_attempts.json"
METRICS_LOG = "toy_metrics.jsonl"
COMPLETIONS_LOG = "toy_completions.jsonl"
DIM = 8
DECAY = 0.9


def block_frequencies(block_id: str) -> np.ndarray:
    """Per-block constants of the update (from a hash of the id: stable across processes)."""
    digest = hashlib.sha256(block_id.encode("utf-8")).digest()
    return 0.05 + np.frombuffer(digest[:DIM], dtype=np.uint8).astype(np.float64) / 255.0


def toy_step(v: np.ndarray, step: int, freqs: np.ndarray) -> np.ndarray:
    """One "training" step: v <- DECAY * v + sin((step + 1) * freqs)."""
    return DECAY * v + np.sin((step + 1) * freqs)


def toy_block_job(block_id: str, out_dir: str, resume: bool, steps: int = 20, step_seconds: float = 0.05,
                  fail_at_step: int | None = None, fail_attempts: int = -1, fail_mode: str = "raise",
                  data_parallel: bool = False, **_: object) -> dict:
    """Run the toy training of one block; see the module docstring.

    Args:
        steps: training steps.
        step_seconds: sleep per step, standing in for the work.
        fail_at_step: fail when reaching this step (to test error handling)...
        fail_attempts: ...in the first this-many attempts only (-1: in every attempt)...
        fail_mode: ...by raising a RuntimeError ("raise") or by the process SIGKILLing
            itself ("sigkill", a worker death).
        data_parallel: join the block's torch.distributed group (LocalExecutor with
            procs_per_block > 1): each rank updates its share of the vector and an
            all-reduce assembles it, so the result equals the single-process one.
    """
    if fail_mode not in ("raise", "sigkill"):
        raise CitygenError(None, f"fail_mode must be 'raise' or 'sigkill', got {fail_mode!r}")
    out = Path(out_dir)
    freqs = block_frequencies(block_id)
    ckpt = out / CHECKPOINT
    rank, size = init_block_process_group() if data_parallel else (0, 1)
    step, v = 0, np.zeros(DIM, dtype=np.float64)
    if resume and ckpt.is_file():
        step, v = _load_checkpoint(ckpt, block_id)  # every rank starts from rank 0's checkpoint

    attempts = json.loads((out / ATTEMPTS_LOG).read_text()) if (out / ATTEMPTS_LOG).is_file() else []
    if rank == 0:
        attempts.append({"start_step": step, "pid": os.getpid(), "world_size": size})
        atomic_write_json(out / ATTEMPTS_LOG, attempts)
        truncate_metrics(out / METRICS_LOG, step)
    share = np.arange(DIM) % size == rank  # this rank's entries of the vector

    while step < steps:
        if step == fail_at_step and (fail_attempts < 0 or len(attempts) <= fail_attempts):
            if fail_mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"toy failure at step {step}")
        time.sleep(step_seconds)
        v = toy_step(v, step, freqs)
        if size > 1:
            v = _all_reduce_sum(np.where(share, v, 0.0))
        step += 1
        if rank == 0:
            with open(out / METRICS_LOG, "a") as f:  # like the trainer: the line before the checkpoint
                f.write(json.dumps({"step": step, "pid": os.getpid()}) + "\n")
            with atomic_path(ckpt) as tmp:
                save_file({"v": v}, str(tmp), metadata={"step": str(step), "block_id": block_id})
            report_progress(out, step)
    if rank == 0:
        with open(out / COMPLETIONS_LOG, "a") as f:  # appended, never rewritten: every completion stays
            f.write(json.dumps({"pid": os.getpid(), "step": step}) + "\n")
    if size > 1:
        # deferred: citygen.distributed imports no torch (3 s), so `citygen status` and the executor's parent start without it
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"block_id": block_id, "steps": steps, "value": v.tolist()}


def _all_reduce_sum(x: np.ndarray) -> np.ndarray:
    # deferred: citygen.distributed imports no torch (3 s), so `citygen status` and the executor's parent start without it
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(x)
    dist.all_reduce(t)
    return t.numpy()


def toy_env_job(block_id: str, out_dir: str, resume: bool, names: tuple[str, ...] | list[str] = (),
                **_: object) -> dict:
    """A job that only reports the environment variables it was given (to test executors)."""
    return {"block_id": block_id, "env": {name: os.environ.get(name) for name in names}}


def _load_checkpoint(path: Path, block_id: str) -> tuple[int, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("block_id") != block_id:
        raise CitygenError(path, f"checkpoint of block {meta.get('block_id')!r}, expected {block_id!r}")
    return int(meta["step"]), load_file(str(path))["v"]
