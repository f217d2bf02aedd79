"""Worker process of the local executor: ``python -m citygen.distributed.worker``.

Reads ``{"task": <BlockTask as a dict>, "resume": bool, "hold_wait_s": float}`` as JSON on
stdin (no command line to parse), runs one attempt, and exits 0 when it finished, 1 when
the job failed, 3 (:data:`EXIT_HELD`) when another live process holds the block.  With a
RANK above 0 in the environment it is a data-parallel follower: it runs the job without
touching the block's state.  Logs (tracebacks, the job's prints) go to stdout/stderr, which
the executor sends to ``out_dir/worker*.log``.

A worker dies with its executor: on Linux the kernel sends it SIGKILL when the executor
dies (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog thread kills the worker's
process group once its parent is no longer the executor (``os.getppid()`` changes when a
process is orphaned).  The watchdog is a thread of the worker, not a check in the
trainer's loop, so that it covers every block job and a step that takes minutes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading

from .attempt import BlockJobError, run_attempt, run_follower_rank
from .lease import EXECUTOR_PID_ENV, EXIT_HELD, BlockHeldError
from .task import BlockTask

#: seconds between the watchdog's looks at the parent pid.
WATCH_S = 1.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this process (and its process group) die when ``parent_pid``, its parent, dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still works
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        _kill_own_group()

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                _kill_own_group()
            threading.Event().wait(WATCH_S)

    threading.Thread(target=watch, daemon=True, name="citygen-parent-watchdog").start()


def _kill_own_group() -> None:
    if os.getpgrp() == os.getpid():  # a worker leads its own session and process group
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parent = os.environ.get(EXECUTOR_PID_ENV, "")
    if parent.isdigit():
        die_with_parent(int(parent))

    message = json.loads(sys.stdin.read())
    task, resume = BlockTask.from_dict(message["task"]), bool(message["resume"])
    try:
        if int(os.environ.get("RANK", "0")) > 0:
            run_follower_rank(task, resume)
        else:
            run_attempt(task, resume, hold_wait_s=float(message.get("hold_wait_s", 0.0)))
    except BlockHeldError as err:
        print(f"citygen worker: {err}", file=sys.stderr)
        return EXIT_HELD
    except BlockJobError as err:
        print(f"citygen worker: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
