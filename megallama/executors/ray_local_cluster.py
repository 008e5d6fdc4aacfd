"""A multi-node Ray cluster on this one machine (for tests and benchmarks): nodes started with
`ray start`, each with its own temp folder, CPU count and a small object store, and stopped by
ending exactly the processes they started (`ray stop` would end every Ray process on the machine,
other users' included). Linux only (reads /proc)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

OBJECT_STORE_BYTES = 100 * 1024 * 1024


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, ValueError, IndexError):
            continue
        table[int(name)] = (ppid, cmd)
    return table


class LocalRayCluster:
    """`nodes` Ray nodes with `cpus_per_node` CPUs each; `address` is the head's. Use as a context
    manager, or call stop() (also after a failed start)."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = OBJECT_STORE_BYTES) -> None:
        self.root = tempfile.mkdtemp(prefix="mlray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
        self.temp_dirs = [os.path.join(self.root, f"node{i}") for i in range(nodes)]
        head_port, self._client_port, dashboard_port = _free_ports(3)
        self.address = f"127.0.0.1:{head_port}"
        try:
            for i, temp_dir in enumerate(self.temp_dirs):
                role = (["--head", "--port", str(head_port), "--ray-client-server-port", str(self._client_port),
                         "--include-dashboard", "false", "--dashboard-port", str(dashboard_port)] if i == 0
                        else ["--address", self.address])
                self._ray_start(role, temp_dir, cpus_per_node, object_store_bytes)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _ray_start(role: list[str], temp_dir: str, cpus: int, object_store_bytes: int) -> None:
        agent_port, env_port, metrics_port = _free_ports(3)
        beside_python = os.path.join(os.path.dirname(sys.executable), "ray")
        ray_cli = beside_python if os.path.exists(beside_python) else shutil.which("ray") or "ray"
        cmd = [ray_cli, "start", *role, "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(cpus), "--temp-dir", temp_dir, "--object-store-memory", str(object_store_bytes),
               "--disable-usage-stats", "--dashboard-agent-listen-port", str(agent_port),
               "--runtime-env-agent-port", str(env_port), "--metrics-export-port", str(metrics_port)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                                env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")

    def processes(self) -> set[int]:
        """Every live process of this cluster: its daemons and their children, workers included."""
        table = _proc_table()
        roots = {pid for pid, (_, cmd) in table.items()
                 if self.root in cmd or ("ray.util.client.server" in cmd and f"--port={self._client_port} " in cmd)}
        found, frontier = set(roots), set(roots)
        while frontier:
            frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found}
            found |= frontier
        found.discard(os.getpid())
        return found

    def stop(self) -> None:
        pids = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 5
            while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
