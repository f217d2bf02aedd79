"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes, each
started by ``ray start --block`` as its own process in its own session, so that one node can
be killed (its whole process group: ``ray start``, raylet, its workers) while the others run.

``ray stop`` is not used: it stops every Ray process of the machine, other people's clusters
included.  Each node gets its own ``--temp-dir`` and free ports instead of Ray's defaults.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from citygen.distributed.state import process_alive, process_start_time

# Node death is noticed after period x threshold (Ray's defaults: 3 s x 5, plus a 5 s delay).
FAST_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                      "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """``ray start --head --num-cpus 0`` (so that every task lands on a worker) plus
    ``n_workers`` nodes with ``--num-cpus 1`` each, all on 127.0.0.1."""

    def __init__(self, n_workers: int = 2, env: dict[str, str] | None = None, start_timeout_s: float = 90):
        self.ray = shutil.which("ray")
        if self.ray is None:
            raise RuntimeError("the ray command is not on PATH")
        # short: Ray's unix socket paths live below it (108 characters at most)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="cgray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Without token authentication: a token in ~/.ray/auth_token would turn it on for the head
        # only, and a driver process reads the mode once, when it first imports ray.  The nodes
        # listen on 127.0.0.1 and live for one test.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0", **FAST_HEALTH_CHECKS, **(env or {})}
        self.nodes: dict[str, subprocess.Popen] = {}
        self._seen: set[tuple[int, int | None]] = set()  # (pid, start time) of every node process seen
        self.start_timeout_s = start_timeout_s
        try:
            self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                                 "--dashboard-port", str(free_port())])
            self.wait_for_nodes(1)
            for i in range(n_workers):
                self.add_worker(f"worker{i}")
            self.wait_for_nodes(1 + n_workers)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        # one temp dir per node: nodes sharing one would share (and fight over) their socket names
        node_dir = self.temp_dir / name
        node_dir.mkdir()
        log = open(self.temp_dir / f"{name}.log", "wb")
        common = ["--block", "--temp-dir", str(node_dir), "--node-ip-address", "127.0.0.1",
                  "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                  "--metrics-export-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                  "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                  "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
        self.nodes[name] = subprocess.Popen([self.ray, "start", *args, *common], stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()

    def add_worker(self, name: str) -> None:
        self._start(name, ["--address", self.address, "--num-cpus", "1"])

    def alive_nodes(self) -> int:
        """Nodes the head's GCS counts as alive (asked from a child process: it needs the cluster's
        auth settings in its environment)."""
        code = ("import sys; from ray._raylet import GcsClient; "
                "infos = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values(); "
                "print(sum(i.state == 0 for i in infos))")
        out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True,
                             env=self.env, timeout=60)
        return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0

    def wait_for_nodes(self, n: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: {(self.temp_dir / f'{name}.log').read_text()[-2000:]}")
            if self.alive_nodes() >= n:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {n} nodes in {self.start_timeout_s} s")

    def node_of_pid(self, pid: int) -> str | None:
        """The node (its name here) that runs ``pid`` (a task's worker process): its raylet is an
        ancestor of it (Ray gives each worker its own process group, so the group does not tell)."""
        groups = {proc.pid: name for name, proc in self.nodes.items()}
        while pid > 1:
            try:
                if os.getpgid(pid) in groups:
                    return groups[os.getpgid(pid)]
                stat = Path(f"/proc/{pid}/stat").read_text()
            except (ProcessLookupError, OSError):
                return None
            pid = int(stat[stat.rindex(")") + 2:].split()[1])  # the parent
        return None

    def node_tree(self, name: str) -> set[int]:
        """The pids of a node: its process group (``ray start``, raylet, agents) and every
        process below them (task workers lead their own groups)."""
        root = self.nodes[name].pid
        table = _process_table()
        tree = {pid for pid, (_, pgid) in table.items() if pgid == root}
        if self.nodes[name].poll() is None:
            tree.add(root)
        while True:
            more = {pid for pid, (ppid, _) in table.items() if ppid in tree} - tree
            if not more:
                break
            tree |= more
        self._seen |= {(pid, process_start_time(pid)) for pid in tree}
        return tree

    def kill_node(self, name: str) -> None:
        """SIGKILL a whole node at once, as if its machine died."""
        for pid in self.node_tree(name):
            with _no_such_process():
                os.kill(pid, signal.SIGKILL)
        self.nodes[name].wait()

    def processes(self) -> list[str]:
        """The cluster's processes still alive (zombies do not count)."""
        for name in self.nodes:
            self.node_tree(name)
        return [f"{pid} {_cmdline(pid)}" for pid, start in sorted(self._seen, key=lambda x: x[0])
                if process_alive(pid, start)]

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of each node's processes now, in MiB."""
        out = {}
        for name in self.nodes:
            total = 0
            for pid in self.node_tree(name):
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except OSError:
                    pass
            out[name] = round(total / 2**20, 1)
        return out

    def stop(self, grace_s: float = 5) -> None:
        """Stop every node: SIGTERM (``ray start --block`` then stops its node), SIGKILL after ``grace_s``."""
        self.processes()  # note every process now: a daemon can outlive its `ray start`
        for proc in self.nodes.values():
            if proc.poll() is None:
                with _no_such_process():
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for pid, start in self._seen:  # daemons and workers that outlived their `ray start`
            if process_alive(pid, start):
                with _no_such_process():
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not os.environ.get("CITYGEN_KEEP_RAY_TMP"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class _no_such_process:
    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        return typ is ProcessLookupError


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid="], capture_output=True, text=True).stdout
    return {int(a): (int(b), int(c)) for a, b, c in (line.split() for line in out.splitlines())}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
    except OSError:
        return "?"
