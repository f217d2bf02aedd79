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

from survey_io.atomic import atomic_write_json, atomic_write_text

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


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether a process with this id exists on this host (a zombie does not count).

    With ``start_time`` (from :func:`process_start_time`, where /proc exists) it must also be
    the same process, not a later one that got the same id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS) or it just exited: trust kill(0)
        return True
    # A zombie has exited; it lingers only until its (new) parent reaps it, which a
    # container's init may never do.  (A zombie main thread whose other threads still
    # run their exit is not gone yet: it may still hold its files and locks.)
    if stat[0] == "Z" and int(stat[17]) <= 1:
        return False
    return start_time is None or int(stat[19]) == int(start_time)


def process_start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (Linux /proc); None elsewhere.

    Together with the pid it names a process for good: a pid is reused, the pair is not.
    """
    stat = _proc_stat(pid)
    return int(stat[19]) if stat else None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the lines of a JSONL metrics log past ``step`` (and any torn last line).

    A run resumed from its checkpoint at ``step`` logs the later steps again, so the log
    stays monotonic after a kill and a resume (no 50, 100, 100, 150).
    """
    path = Path(path)
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and _line_step(ln) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62
