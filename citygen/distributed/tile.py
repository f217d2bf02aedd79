"""Running a tile's blocks through an executor, and reading back where the tile stands."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from survey_io.atomic import atomic_write_json

from ..errors import CitygenError
from .lease import LOCK_FILE as LOCK_FILE_BLOCK
from .lease import BlockHeldError, hold_block, holder, remove_stale_temps
from .state import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    STATES,
    is_finished,
    process_alive,
    read_result,
    read_state,
    this_host,
    update_state,
    utc_now,
)
from .task import BlockTask, resolve_job

MANIFEST_FILE = "tile_run.json"
LOCK_FILE = ".tile_run.lock"


@dataclass
class BlockOutcome:
    """How one block ended in a :func:`run_tile` call."""

    block_id: str
    state: str  # done | failed
    attempts: int  # attempts recorded in the block's state (all runs together)
    result: dict | None = None
    error: str | None = None
    skipped: bool = False  # finished in an earlier run: not run again


class Executor(Protocol):
    """Runs block tasks to completion or failure, retrying as it sees fit.

    ``execute`` gets only blocks that are not finished yet, and returns one outcome per
    task.  It must not raise for a failing block: a failure is an outcome.
    """

    def execute(self, tasks: Sequence[BlockTask]) -> dict[str, BlockOutcome]: ...


@dataclass
class TileResult:
    """The outcome of every block of a :func:`run_tile` call."""

    tile_dir: Path
    blocks: dict[str, BlockOutcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every block is done."""
        return all(b.state == DONE for b in self.blocks.values())

    @property
    def failed(self) -> list[str]:
        return sorted(b.block_id for b in self.blocks.values() if b.state != DONE)

    def raise_for_failures(self) -> None:
        """Raise a CitygenError naming the failed blocks and their errors, if any."""
        if not self.ok:
            detail = "; ".join(f"{b}: {self.blocks[b].error}" for b in self.failed)
            raise CitygenError(self.tile_dir, f"{len(self.failed)} block(s) failed: {detail}")


def outcome_from_state(task: BlockTask, *, error: str | None = None) -> BlockOutcome:
    """Build a block's outcome from what its files say now."""
    state = read_state(task.path) or {}
    if is_finished(task.path):
        return BlockOutcome(task.block_id, DONE, int(state.get("attempts", 0)), result=read_result(task.path))
    return BlockOutcome(task.block_id, FAILED, int(state.get("attempts", 0)),
                        error=error or state.get("error") or "block did not finish")


def run_tile(tasks: Sequence[BlockTask], executor: Executor, tile_dir: str | Path,
             wait_held_s: float = 0.0) -> TileResult:
    """Train every block of a tile that has not finished yet, and return every block's outcome.

    Finished blocks (state ``done`` and a result file) are skipped and keep their files
    untouched; unfinished ones resume from their checkpoints.  The tile's block list goes to
    ``tile_dir/tile_run.json`` so :func:`tile_status` can report on it at any time.  Only
    one ``run_tile`` may work on a tile at a time (a lock file in ``tile_dir``).

    A block that another live process holds (:mod:`citygen.distributed.lease`) is not
    trained: after up to ``wait_held_s`` seconds its outcome is ``failed`` with the error
    ``held by pid P on host H since T`` and its files are left to the holder.  A block held
    by an orphaned worker of an earlier, killed run is stopped first and then trained.

    Raises:
        CitygenError: bad tasks (duplicate ids, unknown job) or the tile is already being run.
    """
    tile_dir = Path(tile_dir)
    ids = [t.block_id for t in tasks]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CitygenError(tile_dir, f"duplicate block ids: {', '.join(duplicates)}")
    dirs = [str(Path(t.out_dir).resolve()) for t in tasks]
    if len(set(dirs)) != len(dirs):
        raise CitygenError(tile_dir, "two blocks share one out_dir")
    for job in sorted({t.job for t in tasks}):
        resolve_job(job)  # fail before starting anything

    tile_dir.mkdir(parents=True, exist_ok=True)
    with _tile_lock(tile_dir):
        remove_stale_temps(tile_dir, recursive=False)  # ours under the tile lock (block folders: theirs)
        _write_manifest(tile_dir, tasks, executor)
        result = TileResult(tile_dir)
        todo = []
        for task in tasks:
            if is_finished(task.path):
                outcome = outcome_from_state(task)
                outcome.skipped = True
                result.blocks[task.block_id] = outcome
                continue
            try:
                # Held only to check and to mark it pending: the attempt takes the block again.
                with hold_block(task.path, wait_s=wait_held_s, stop_orphans=True, role="run_tile"):
                    if is_finished(task.path):  # an orphan we stopped may have just finished it
                        outcome = outcome_from_state(task)
                        outcome.skipped = True
                        result.blocks[task.block_id] = outcome
                        continue
                    state = read_state(task.path)
                    if state is None or state["state"] != PENDING:
                        update_state(task.path, block_id=task.block_id, state=PENDING)
            except BlockHeldError as err:
                state = read_state(task.path) or {}
                result.blocks[task.block_id] = BlockOutcome(task.block_id, FAILED, int(state.get("attempts", 0)),
                                                            error=err.reason)
                continue
            todo.append(task)
        if todo:
            outcomes = executor.execute(todo)
            for task in todo:
                result.blocks[task.block_id] = outcomes.get(task.block_id) or outcome_from_state(
                    task, error="the executor returned no outcome for this block")
    return result


def tile_status(tile_dir: str | Path) -> dict[str, Any]:
    """Summarize every block of a tile from its state files; safe while the tile runs.

    Returns a dict ``{"tile_dir", "total", "counts": {state: n}, "complete", "blocks": [...]}``
    where each block is its ``state.json`` plus ``block_id``, ``out_dir``, ``finished``
    (done and has a result) and, for a block running on this host, ``alive`` (whether its
    worker process still exists: a dead one means the run was interrupted).  A block that a
    live process holds (:mod:`citygen.distributed.lease`) is ``running`` whatever its state
    file says, with ``alive`` True and ``holder``: that process's lease (pid, host, started,
    heartbeat).

    Raises:
        CitygenError: ``tile_dir`` holds no tile run.
    """
    tile_dir = Path(tile_dir)
    if not tile_dir.is_dir():
        raise CitygenError(tile_dir, "not a folder")
    blocks = _blocks_of(tile_dir)
    counts = {s: 0 for s in STATES}
    rows = []
    for block_id, out_dir in blocks:
        state = read_state(out_dir) or {"state": PENDING, "attempts": 0}
        row = {"block_id": block_id, "out_dir": str(out_dir), **state, "finished": is_finished(out_dir)}
        row["block_id"] = block_id
        lease = holder(out_dir)
        if lease is not None:
            row.update(state=RUNNING, alive=True, holder=lease)
            row.update({k: lease[k] for k in ("pid", "host") if k in lease})
        elif row["state"] == RUNNING and (out_dir / LOCK_FILE_BLOCK).exists():
            row["alive"] = False  # an attempt holds its block while it runs: nobody does
        elif row["state"] == RUNNING and row.get("host") == this_host() and row.get("pid"):
            row["alive"] = process_alive(int(row["pid"]))  # a block run before blocks had locks
        counts[row["state"]] += 1
        rows.append(row)
    return {"tile_dir": str(tile_dir), "total": len(rows), "counts": counts,
            "complete": all(r["finished"] for r in rows), "blocks": rows}


def _blocks_of(tile_dir: Path) -> list[tuple[str, Path]]:
    manifest = tile_dir / MANIFEST_FILE
    if not manifest.is_file():
        raise CitygenError(tile_dir, f"no tile run here (no {MANIFEST_FILE}; run_tile writes it)")
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["blocks"]
        return [(e["block_id"], _abs(tile_dir, e["out_dir"])) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CitygenError(manifest, f"not a tile run manifest ({err})") from None


def _abs(tile_dir: Path, out_dir: str) -> Path:
    p = Path(out_dir)
    return p if p.is_absolute() else tile_dir / p


def _write_manifest(tile_dir: Path, tasks: Sequence[BlockTask], executor: Executor) -> None:
    """Record the tile's blocks (merged with those of earlier runs) for tile_status."""
    path = tile_dir / MANIFEST_FILE
    entries: dict[str, dict] = {}
    if path.is_file():
        try:
            entries = {e["block_id"]: e for e in json.loads(path.read_text(encoding="utf-8"))["blocks"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            entries = {}
    root = tile_dir.resolve()
    for task in tasks:
        out = task.path.resolve()
        rel = os.path.relpath(out, root) if out.is_relative_to(root) else str(out)
        entries[task.block_id] = {"block_id": task.block_id, "out_dir": rel, "job": task.job, "kwargs": task.kwargs}
    atomic_write_json(path, {"blocks": list(entries.values()), "executor": type(executor).__name__,
                             "host": this_host(), "started": utc_now()})


@contextlib.contextmanager
def _tile_lock(tile_dir: Path) -> Iterator[None]:
    with open(tile_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CitygenError(tile_dir, "another run_tile is working on this tile") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
