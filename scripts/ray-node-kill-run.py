#!/usr/bin/env python
"""Train a planned tile on a real multi-node Ray cluster on this machine and kill one worker
node while it trains a block: the check behind README's "Ray cluster" section.

    python scripts/ray-node-kill-run.py TILE DATA [--workers 2] [--kill-at-step 50] [-- TRAIN-TILE OPTIONS]

Starts ``ray start --head --num-cpus 0`` and worker nodes (``--num-cpus 1`` each) as separate
processes (tests/raycluster.py), runs ``citygen train-tile TILE --data DATA --executor ray
--ray-address HEAD`` with the options after ``--``, SIGKILLs the node running the first block
whose state reports a checkpoint at ``--kill-at-step`` or later, and prints what each block's
files say at the end (attempts, who trained it, checkpoints).  Every node is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from raycluster import LocalRayCluster  # noqa: E402

from citygen.distributed import read_state  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tile", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-at-step", type=int, default=50)
    args = ap.parse_args(argv)
    blocks = [b["id"] for b in json.loads((args.tile / "plan.json").read_text())["blocks"]]
    t0 = time.monotonic()
    cluster = LocalRayCluster(n_workers=args.workers)
    print(f"[{time.monotonic() - t0:6.1f} s] cluster up: head {cluster.address} + {args.workers} worker nodes", flush=True)
    try:
        cmd = [sys.executable, "-m", "citygen.cli", "train-tile", str(args.tile), "--data", str(args.data),
               "--executor", "ray", "--ray-address", cluster.address, *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        env = {**cluster.env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(args.tile.parent / "train-tile.log", "w") as log:
            run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
            killed, seen, rss_seen = None, {}, set()
            while run.poll() is None:
                for b in blocks:
                    state = read_state(args.tile / f"block_{b}") if (args.tile / f"block_{b}").is_dir() else None
                    if not state:
                        continue
                    key = (state["state"], state.get("pid"), state.get("attempts"))
                    if seen.get(b) != key:
                        seen[b] = key
                        print(f"[{time.monotonic() - t0:6.1f} s] {b}: {state['state']} attempt {state.get('attempts')} "
                              f"pid {state.get('pid')} node {cluster.node_of_pid(state.get('pid') or 0)}", flush=True)
                    if state["state"] == "running" and b not in rss_seen:  # memory of the nodes while they train
                        rss_seen.add(b)
                        print(f"[{time.monotonic() - t0:6.1f} s] resident memory per node (MiB): {cluster.rss_mb()}",
                              flush=True)
                    if (killed is None and state["state"] == "running"
                            and state.get("last_checkpoint_step", 0) >= args.kill_at_step):
                        node = cluster.node_of_pid(state["pid"])
                        if node:
                            cluster.kill_node(node)
                            killed = (b, node, state["pid"], state["last_checkpoint_step"])
                            print(f"[{time.monotonic() - t0:6.1f} s] KILLED node {node} (all its processes) while it "
                                  f"trained {b} (pid {state['pid']}, checkpoint at step {state['last_checkpoint_step']})",
                                  flush=True)
                time.sleep(0.05)
            out = run.stdout.read()
        print(f"[{time.monotonic() - t0:6.1f} s] train-tile exited with status {run.returncode}")
        print(out)
        for b in blocks:
            d = args.tile / f"block_{b}"
            state = read_state(d) or {}
            ckpts = sorted(p.name for p in (d / "checkpoints").glob("*")) if (d / "checkpoints").is_dir() else []
            print(f"{b}: state {state.get('state')}, attempts {state.get('attempts')}, resumed {state.get('resumed')}, "
                  f"result.json {(d / 'result.json').is_file()}, checkpoints {ckpts}, "
                  f"lease left {(d / 'lease.json').exists()}")
        return run.returncode
    finally:
        cluster.stop()
        print("processes left:", cluster.processes())


if __name__ == "__main__":
    sys.exit(main())
