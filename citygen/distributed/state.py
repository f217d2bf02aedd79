"""Per-block state files: what a block is doing, readable at any time by anyone.

Each block's ``out_dir`` holds ``state.json`` (written atomically, so a reader never sees
half a file) and, once the block has finished, ``result.json``.  A block is *finished* when
its state is ``done`` and its result file exists; finished blocks are never run again.

``state.json`` fields::

    block_id              the block's id
    state                 pending | running | done | failed
    attempts              attempts started so far (all runs of the tile together)
    pid, host             the process running (or that last ran) the block
    started, updated      ISO-8601 UTC times of the current attempt's start / the last write
    last_checkpoint_step  the last step the job reported with report_progress (if it does)
    resumed               whether the current attempt was asked to resume from a checkpoint
    error                 the last error ("ExcType: message", or how the worker died), else null
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from survey_io.atomic import atomic_write_json

from ..errors import CitygenError

STATE_FILE = "state.json"
RESULT_FILE = "result.json"

PENDING = "pending"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
STATES = (PENDING, RUNNING, DONE, FAILED)


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The block's state, or None when it has none yet.

    Raises:
        CitygenError: the state file exists but is not a JSON object.
    """
    path = Path(out_dir) / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise CitygenError(path, f"not valid JSON ({err})") from None
    if not isinstance(state, dict) or state.get("state") not in STATES:
        raise CitygenError(path, f"not a block state (expected an object with state in {STATES})")
    return state


def update_state(out_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the block's state file (creating it) and stamp ``updated``.

    Only one process writes a block's state at a time (the worker while it lives, the
    executor after it has exited), so a read-modify-write is safe here.
    """
    out_dir = Path(out_dir)
    state = read_state(out_dir) or {"state": PENDING, "attempts": 0}
    state.update(fields)
    state["updated"] = utc_now()
    atomic_write_json(out_dir / STATE_FILE, state)
    return state


def report_progress(out_dir: str | Path, step: int) -> None:
    """Record that the job running in ``out_dir`` has a checkpoint at ``step``.

    Block jobs call this after each checkpoint they write, so that ``citygen status``
    shows how far each block has come.  Outside an executor (no state file) it does nothing.
    """
    if (Path(out_dir) / STATE_FILE).is_file():
        update_state(out_dir, last_checkpoint_step=int(step))


def is_finished(out_dir: str | Path) -> bool:
    """True when the block is done and its result file exists (it will not run again)."""
    out_dir = Path(out_dir)
    state = read_state(out_dir)
    return state is not None and state["state"] == DONE and (out_dir / RESULT_FILE).is_file()


def read_result(out_dir: str | Path) -> dict[str, Any]:
    """The finished block's result (the dict its job returned)."""
    path = Path(out_dir) / RESULT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CitygenError(path, "missing: the block has not finished") from None
    except json.JSONDecodeError as err:
        raise CitygenError(path, f"not valid JSON ({err})") from None


def this_host() -> str:
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
