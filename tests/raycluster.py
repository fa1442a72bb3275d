"""A real multi-node Ray cluster on 127.0.0.1 for tests: one `ray start --block` process per node.

    with local_cluster(head_cpus=1) as cluster:          # head only
        worker = cluster.add_worker(resources={"decode": 1})
        cluster.wait_for_nodes(2)
        run a driver with env=cluster.env and RAY_ADDRESS=cluster.address ...
        cluster.kill(worker)                              # a lost machine: SIGKILL, no clean exit

Every node is its own session (process group) with its own short --temp-dir and its own
free ports, so several clusters (other people's, other tests') can share this machine.
Teardown kills exactly the processes of this cluster's nodes; it never runs `ray stop`,
which would stop every Ray on the machine.

Ray 2.60 facts this relies on: `--node-ip-address=127.0.0.1` is rewritten to the
machine's routable IP (nodes register as that IP; 127.0.0.1:PORT still reaches the GCS,
and the dashboard stays on 127.0.0.1); `ray start` records its address in
TEMP_DIR/ray_current_cluster, where a plain `ray.init()` would find and join it, hence
never the default /tmp/ray; a driver on a machine with several nodes attaches to the head.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import psutil

from placeforge.raysession import free_port

BIN = Path(sys.executable).parent
RAY = BIN / "ray"


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the nodes and for drivers/CLIs talking to them.

    Ray 2.60 turns token auth on whenever ~/.ray/auth_token exists (any local ray.init
    creates one), so every side is put in token mode and a token is made if missing
    (`--generate` never replaces an existing one, so other clusters keep working).
    """
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_DISABLE_USAGE_STATS="1", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)  # a node or driver must never join a cluster from the caller's shell
    env.update(extra or {})
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    return env


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen  # `ray start --block`, leader of its own process group
    temp_dir: Path
    log: Path  # stdout and stderr of `ray start`
    resources: dict[str, float] = field(default_factory=dict)

    def processes(self) -> list[psutil.Process]:
        """`ray start` and everything under it (GCS, raylet, agents, workers), while it still has them."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def titles(self) -> list[str]:
        """Command lines of its processes; a busy Ray worker is titled after its task (`ray::Map(fn)`)."""
        titles = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                titles.append(" ".join(process.cmdline()))
        return titles


class RayClusterError(RuntimeError):
    """A node did not start or the cluster did not reach the expected size; the message has the logs."""


class LocalCluster:
    """A head and worker nodes on 127.0.0.1; see the module docstring."""

    def __init__(self, root: Path, env: dict[str, str], object_store_bytes: int) -> None:
        self.root = root
        self.env = env
        self.object_store_bytes = object_store_bytes
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url: str | None = None
        self.nodes: list[RayNode] = []

    def driver_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a driver process that joins this cluster (placeforge.raysession reads $RAY_ADDRESS)."""
        return dict(self.env, RAY_ADDRESS=self.address, **(extra or {}))

    def start_head(self, num_cpus: int, dashboard: bool = False, resources: dict[str, float] | None = None) -> RayNode:
        # The GCS declares a silent node dead after ~3 s instead of Ray's ~15 s (lost-node tests wait for it).
        system_config = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                         "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}
        args = ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port()}",
                f"--system-config={json.dumps(system_config)}"]
        if dashboard:  # the job API and the state API (`ray list tasks`) live in the dashboard
            port = free_port()
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}"]
            self.dashboard_url = f"http://127.0.0.1:{port}"
        else:
            args += ["--include-dashboard=false"]
        return self._start("head", args, num_cpus, resources)

    def add_worker(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> RayNode:
        return self._start(f"w{len(self.nodes)}", [f"--address={self.address}"], num_cpus, resources)

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict[str, float] | None) -> RayNode:
        temp_dir = self.root / name  # short: Ray's socket paths must stay under ~107 characters
        temp_dir.mkdir(parents=True)
        # Fixed default ports (agent 52365, client server 10001, ...) collide with other Rays on this machine.
        cmd = [
            str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--resources={json.dumps(resources or {})}", *args,
        ]  # fmt: skip
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(name, process, temp_dir, log, dict(resources or {}))
        self.nodes.append(node)
        if name == "head":
            self._wait_for_gcs(node, timeout_s=90)
        return node

    def _wait_for_gcs(self, head: RayNode, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if head.process.poll() is not None:
                raise RayClusterError(f"the head exited with {head.process.returncode}:\n{self.log_tail(head)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1):
                return
            time.sleep(0.2)
        raise RayClusterError(f"the head's GCS is not listening on {self.address} after {timeout_s:.0f} s:\n"
                              f"{self.log_tail(head)}")

    def wait_for_nodes(self, alive: int, timeout_s: float = 120) -> list[dict]:
        """Block until exactly `alive` nodes are alive; returns `ray.nodes()` of the alive ones.

        Asked from a short-lived driver process, so the test process itself never joins the cluster.
        """
        script = (
            "import json, sys, time, ray\n"
            "ray.init(log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout_s}\n"
            "while True:\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            f"    if len(nodes) == {alive} or time.monotonic() > deadline:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps([{'NodeID': n['NodeID'], 'Resources': n['Resources']} for n in nodes]))\n"
        )
        try:
            result = subprocess.run([sys.executable, "-c", script], env=self.driver_env(), capture_output=True,
                                    text=True, timeout=timeout_s + 60)
        except subprocess.TimeoutExpired as err:
            raise RayClusterError(f"no answer from {self.address} in {timeout_s + 60:.0f} s\n{self.all_logs()}") from err
        if result.returncode != 0:
            raise RayClusterError(f"cannot query {self.address}: {result.stderr[-2000:]}\n{self.all_logs()}")
        nodes = json.loads(result.stdout.strip().splitlines()[-1])
        if len(nodes) != alive:
            raise RayClusterError(f"{len(nodes)} alive nodes in {self.address} after {timeout_s:.0f} s, "
                                  f"expected {alive}\n{self.all_logs()}")
        return nodes

    def kill(self, node: RayNode) -> None:
        """SIGKILL every process of `node` (its group and its workers, which Ray puts in groups of their own)."""
        processes = node.processes()  # collected first: once the raylet dies its workers are re-parented
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=10)
        node.process.wait(timeout=10)

    def shutdown(self) -> None:
        """Kill the workers, then the head (its GCS last, so nodes do not log a lost head), and remove the temp dirs."""
        for node in reversed(self.nodes):
            self.kill(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, node: RayNode, chars: int = 3000) -> str:
        return node.log.read_text(errors="replace")[-chars:] if node.log.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(f"--- {n.name} ({n.temp_dir}):\n{self.log_tail(n, 1500)}" for n in self.nodes)


@contextlib.contextmanager
def local_cluster(
    head_cpus: int,
    workers: Sequence[dict[str, float]] = (),
    dashboard: bool = False,
    extra_env: dict[str, str] | None = None,
    object_store_bytes: int = 200 * 2**20,
    timeout_s: float = 120,
) -> Iterator[LocalCluster]:
    """A head with `head_cpus` CPUs and one 1-CPU worker node per entry of `workers` (its custom resources),
    all alive on exit of the `with` line; torn down (only these processes) when the block ends."""
    if not RAY.exists():
        raise RayClusterError(f"the ray CLI is not installed next to {sys.executable}")
    # /tmp/rt-XXXXXXXX: pytest's tmp_path is too long for Ray's unix socket paths.
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp")), ray_env(extra_env), object_store_bytes)
    try:
        cluster.start_head(head_cpus, dashboard=dashboard)
        for resources in workers:
            cluster.add_worker(1, resources)
        cluster.wait_for_nodes(1 + len(workers), timeout_s)
        yield cluster
    finally:
        cluster.shutdown()
