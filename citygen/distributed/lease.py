"""One owner per block: the block lock, its lease record, and the cleanup its owner does.

A process that trains a block (an executor's attempt, ``citygen train`` on a run folder)
holds the block for its whole life:

- ``out_dir/.block.lock``: an exclusive ``fcntl.flock``.  The kernel drops it when the
  process ends, however it ends (``kill -9`` included), so a dead trainer never keeps a block.
  The file itself is never deleted (a waiter could otherwise lock a file no longer in the
  folder while a newcomer locks a new one).
- ``out_dir/lease.json``: who holds it, for people and messages: ``pid``, ``host``,
  ``started``, ``heartbeat`` (rewritten every :data:`HEARTBEAT_S` seconds), ``pid_start`` (the
  process's start time, so a reused pid is not taken for the holder) and, for a worker of the
  local executor, ``executor_pid`` / ``executor_start``.  Removed on release; one left
  behind by a killed holder on this host is only a record (the lock is what counts).

**Across hosts** (a Ray cluster whose nodes share the block folders) the lock keeps two nodes
apart only where the file system carries ``flock`` between clients (NFSv4, Lustre, CephFS do;
NFSv3 with ``local_lock``, SMB and FUSE object stores often do not).  So the lease also
counts there: a lease written on *another host* whose heartbeat is younger than
:data:`LEASE_STALE_S` means a live holder even when the lock is free, and one that old means
its holder's node is gone: the block is taken over (clocks must agree to well under that,
as NTP keeps them).  And a holder whose heartbeat finds the lease rewritten by another
process has been declared dead and replaced: it exits at once with :data:`EXIT_LEASE_LOST`
before it writes anything more (a node cut off from the cluster that comes back).

Whoever gets the lock first removes the temp files of killed atomic writes in the block's
folders (:func:`remove_stale_temps`): under the lock no other live process writes there, and
a temp file whose writer is still alive is left alone all the same.

Who waits and who refuses (the reason in brackets):

- :func:`citygen.distributed.run_tile` (a rerun of ``citygen train-tile``): a block held by an
  *orphan* (a local executor worker whose executor is gone) is stopped, then trained
  (nobody watches or retries an orphan, and it would keep running for hours; the new run
  resumes from its last checkpoint).  A block held by any other live process is refused at
  once, or after ``wait_held_s``, and reported as ``held by pid P on host H since T`` (the
  tile lock already keeps out a second run of the same tile, so the holder is a foreign
  process whose end nobody can predict); the other blocks train.
- An attempt (a worker, a Ray task, a retry): waits up to the executor's ``hold_wait_s`` (a
  retry may race the exit of the attempt it replaces), then fails as held, without a retry
  and without touching the block's ``state.json`` (which belongs to the holder).
- ``citygen train OUT``: refuses at once (a person is waiting for an answer).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator

from survey_io.atomic import atomic_write_json, temp_files

from ..errors import CitygenError
from .state import process_alive, process_start_time, this_host, utc_now

#: a worker's exit status when another live process holds its block (the executor then
#: leaves the block's state to that holder)
EXIT_HELD = 3
LOCK_FILE = ".block.lock"
LEASE_FILE = "lease.json"
#: seconds between rewrites of the lease's heartbeat.
HEARTBEAT_S = 10.0
#: a lease from another host whose heartbeat is older than this is a dead node's (4.5 missed
#: heartbeats; shorter than the Ray executor's default hold_wait_s, so a retry waits it out).
LEASE_STALE_S = 45.0
#: the exit status of a holder that found its lease taken over (see the module docstring).
EXIT_LEASE_LOST = 75
#: an acquirer keeps trying this long even when told not to wait: a status probe holds the
#: lock (shared) for microseconds.
ACQUIRE_GRACE_S = 0.5
#: set by the local executor in its workers' environment: the executor's pid.
EXECUTOR_PID_ENV = "CITYGEN_EXECUTOR_PID"


class BlockHeldError(CitygenError):
    """Another live process holds the block."""

    def __init__(self, out_dir: str | Path, holder: dict[str, Any] | None):
        self.holder = holder
        super().__init__(out_dir, describe_holder(holder))

    def __reduce__(self):  # Ray ships exceptions between processes
        return BlockHeldError, (self.path, self.holder)


def describe_holder(lease: dict[str, Any] | None) -> str:
    if not lease:
        return "held by another process (it has not written its lease.json yet)"
    return f"held by pid {lease.get('pid')} on host {lease.get('host')} since {lease.get('started')}"


@dataclass
class _Hold:
    file: IO[str]
    lease: dict[str, Any]
    count: int
    stop: threading.Event
    heartbeat: threading.Thread


_holds: dict[str, _Hold] = {}  # realpath of a block folder -> this process's hold on it
_holds_lock = threading.Lock()


@contextlib.contextmanager
def hold_block(out_dir: str | Path, wait_s: float = 0.0, stop_orphans: bool = False,
               role: str = "trainer") -> Iterator[dict[str, Any]]:
    """Hold the block in ``out_dir`` (created) for the ``with`` body; yields the lease.

    Reentrant within a process (an attempt holds the block and its job holds it again).  On
    first acquisition it writes the lease, starts its heartbeat and removes stale temp files.

    Args:
        wait_s: how long to wait for another holder to let go.
        stop_orphans: stop a holder that is an orphaned local-executor worker (see the module
            docstring) instead of waiting for it.
        role: what the holder does, recorded in the lease.

    Raises:
        BlockHeldError: another live process still holds the block after ``wait_s``.
    """
    out_dir = Path(out_dir)
    key = os.path.realpath(out_dir)
    with _holds_lock:
        hold = _holds.get(key)
        if hold is not None:
            hold.count += 1
    if hold is not None:
        try:
            yield hold.lease
        finally:
            with _holds_lock:
                hold.count -= 1
        return

    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK_FILE, "a+")
    try:
        _acquire(f, out_dir, wait_s, stop_orphans)
    except BaseException:
        f.close()
        raise
    try:
        lease = _new_lease(role)
        atomic_write_json(out_dir / LEASE_FILE, lease)
        remove_stale_temps(out_dir)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(out_dir, lease, stop), daemon=True,
                                name=f"citygen-lease-{out_dir.name}")
        hold = _Hold(f, lease, 1, stop, beat)
        beat.start()
        with _holds_lock:
            _holds[key] = hold
        try:
            yield lease
        finally:
            with _holds_lock:
                del _holds[key]
            stop.set()
            beat.join()
            (out_dir / LEASE_FILE).unlink(missing_ok=True)
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _acquire(f: IO[str], out_dir: Path, wait_s: float, stop_orphans: bool) -> None:
    deadline = time.monotonic() + max(wait_s, ACQUIRE_GRACE_S)
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            lease = read_lease(out_dir)
            if not live_foreign_lease(lease):
                return
            # a live holder on another host that this file system's flock does not show us
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            if time.monotonic() >= deadline:
                raise BlockHeldError(out_dir, lease)
            time.sleep(0.2)
            continue
        lease = read_lease(out_dir)
        if stop_orphans and lease and is_orphan(lease):
            stop_holder(out_dir, lease)
            deadline = max(deadline, time.monotonic() + ACQUIRE_GRACE_S)
            continue
        if time.monotonic() >= deadline:
            raise BlockHeldError(out_dir, lease)
        time.sleep(0.05)


def _new_lease(role: str) -> dict[str, Any]:
    now = utc_now()
    lease = {"pid": os.getpid(), "host": this_host(), "started": now, "heartbeat": now, "role": role,
             "pid_start": process_start_time(os.getpid())}
    executor = os.environ.get(EXECUTOR_PID_ENV, "")
    if executor.isdigit() and int(executor) == os.getppid():  # a worker the local executor started
        lease.update(executor_pid=int(executor), executor_start=process_start_time(int(executor)))
    return lease


def _heartbeat(out_dir: Path, lease: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        current = read_lease(out_dir)
        if current is not None and not same_holder(current, lease) and not stop.is_set():
            # Declared dead (our heartbeat went stale) and replaced: every further write of
            # ours would clobber the new holder's checkpoints.
            print(f"citygen: {out_dir}: lost the block to pid {current.get('pid')} on host {current.get('host')}; "
                  "exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_LEASE_LOST)
        lease["heartbeat"] = utc_now()
        try:
            atomic_write_json(out_dir / LEASE_FILE, lease)
        except OSError:  # the folder went away under us: nothing to keep up to date
            return


def same_holder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("host"), a.get("pid"), a.get("pid_start")) == (b.get("host"), b.get("pid"), b.get("pid_start"))


def live_foreign_lease(lease: dict[str, Any] | None, now: datetime | None = None) -> bool:
    """Whether ``lease`` is another host's with a heartbeat younger than :data:`LEASE_STALE_S`
    (a live holder there, whatever this host's ``flock`` says)."""
    if not lease or lease.get("host") in (None, this_host()):
        return False
    try:
        beat = datetime.fromisoformat(str(lease["heartbeat"]))
    except (KeyError, ValueError):
        return False  # no readable heartbeat: nothing shows the holder is alive
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=timezone.utc)
    return ((now or datetime.now(timezone.utc)) - beat).total_seconds() < LEASE_STALE_S


def read_lease(out_dir: str | Path) -> dict[str, Any] | None:
    """The lease record in ``out_dir`` (it may be a dead holder's: see :func:`holder`)."""
    try:
        lease = json.loads((Path(out_dir) / LEASE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def is_held(out_dir: str | Path) -> bool:
    """Whether a live process holds the block (probes the lock without writing anything)."""
    out_dir = Path(out_dir)
    with _holds_lock:
        if os.path.realpath(out_dir) in _holds:
            return True
    try:
        fd = os.open(out_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: never held
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


def holder(out_dir: str | Path) -> dict[str, Any] | None:
    """The live holder's lease (``{}`` when it has not written one yet), or None when free."""
    if not is_held(out_dir):
        lease = read_lease(out_dir)  # a holder on another host may not show in our flock
        return lease if live_foreign_lease(lease) else None
    return read_lease(out_dir) or {}


def is_orphan(lease: dict[str, Any]) -> bool:
    """A live local-executor worker on this host whose executor has died."""
    if lease.get("host") != this_host() or not lease.get("executor_pid") or not lease.get("pid"):
        return False
    return (process_alive(int(lease["pid"]), lease.get("pid_start"))
            and not process_alive(int(lease["executor_pid"]), lease.get("executor_start")))


def stop_holder(out_dir: Path, lease: dict[str, Any], grace_s: float = 5.0) -> None:
    """SIGTERM the holder (its process group when it leads one, as workers do), SIGKILL after
    ``grace_s``; returns once the block is free or the holder is gone."""
    pid = int(lease["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not process_alive(pid, lease.get("pid_start")):
            return
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not is_held(out_dir) or not process_alive(pid, lease.get("pid_start")):
                return
            time.sleep(0.05)


def remove_stale_temps(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temp files of killed atomic writes under ``folder``; returns them.

    Call it only while holding the folder (the block lock, the tile lock): a temp file whose
    writer is alive on this host, or is this process, is kept even then.
    """
    removed = []
    for path, pid in temp_files(folder, recursive):
        if pid is not None and (pid == os.getpid() or process_alive(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
