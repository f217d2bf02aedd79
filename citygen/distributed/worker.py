"""Worker process of the local executor: ``python -m citygen.distributed.worker``.

Reads ``{"task": <BlockTask as a dict>, "resume": bool}`` as JSON on stdin (no command
line to parse), runs one attempt, and exits 0 when it finished, 1 when the job failed.
With a RANK above 0 in the environment it is a data-parallel follower: it runs the job
without touching the block's state.  Logs (tracebacks, the job's prints) go to
stdout/stderr, which the executor sends to ``out_dir/worker*.log``.
"""

from __future__ import annotations

import json
import os
import sys

from .attempt import BlockJobError, run_attempt, run_follower_rank
from .task import BlockTask


def main() -> int:
    message = json.loads(sys.stdin.read())
    task, resume = BlockTask.from_dict(message["task"]), bool(message["resume"])
    try:
        if int(os.environ.get("RANK", "0")) > 0:
            run_follower_rank(task, resume)
        else:
            run_attempt(task, resume)
    except BlockJobError as err:
        print(f"citygen worker: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
