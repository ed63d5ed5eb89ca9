"""A throwaway multi-node Ray cluster on this machine, for tests.

Each node is a ``ray start --block`` process on 127.0.0.1 with its own custom resource (``node_a``,
``node_b``, ...), its own ports (away from Ray's defaults, so clusters of other users of the machine
are left alone) and its own temp dir. ``stop`` ends exactly the processes started here, by process id:
``ray stop`` would end every Ray process of the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
PORTS_PER_NODE = 40  # 10 service ports + 30 worker ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_block(count: int) -> int:
    """The first port of ``count`` consecutive free ports below Linux's ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        if all(_free(p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found")


class NodeStartError(RuntimeError):
    pass


# A node's Python without this project: the editable install's import hook is taken out at start-up
# (sitecustomize runs after site-packages' .pth files), as on a machine whose image lacks the package.
WITHOUT_PACKAGE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
"""


def python_without_package(directory: Path) -> dict[str, str]:
    """Environment variables that give a node's Python no import path to this project."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(WITHOUT_PACKAGE)
    return {"PYTHONPATH": str(directory)}


# A raylet aborts when its dashboard agent has not reported its ports within its wait budget, and
# `ray start` gives up when the node has not registered within 30 s. On a machine shared with busy
# neighbours the agent's start-up can miss both: a node starts at a raised priority (where allowed)
# with a longer agent budget, and is put back to normal priority once registered.
START_NICE = -10
AGENT_WAIT_MS = "60000"


def _start_priority() -> None:
    try:
        os.nice(START_NICE)
    except PermissionError:
        pass


def _renice(pid: int, value: int) -> None:
    """Set the priority of a node's process tree (the `ray start` process and all it started)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.nice(value)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class LocalCluster:
    def __init__(
        self,
        nodes: dict[str, float],
        cpus_per_node: int = 3,
        object_store_mb: int = 300,
        node_env: dict[str, dict[str, str]] | None = None,
    ):
        """``node_env``: extra environment variables for the named nodes' processes."""
        self.nodes = nodes
        self.node_env = node_env or {}
        self.cpus = cpus_per_node
        self.object_store = object_store_mb * 1024 * 1024
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        # the jobs' `python` must be this interpreter
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.env.pop("RAY_ADDRESS", None)
        self.env.setdefault("RAY_agent_register_timeout_ms", AGENT_WAIT_MS)

    def _node_args(self, index: int) -> list[str]:
        p = self.base + PORTS_PER_NODE * index
        args = [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus}",
            f"--object-store-memory={self.object_store}",
            # a temp dir per node, as on separate machines: two nodes sharing one would also share
            # (and replace under a running driver) the unpacked runtime-env working directories
            f"--temp-dir={self.temp_dir / list(self.nodes)[index]}",
            f"--node-manager-port={p + 2}",
            f"--object-manager-port={p + 3}",
            f"--dashboard-agent-listen-port={p + 4}",
            f"--dashboard-agent-grpc-port={p + 5}",
            f"--metrics-export-port={p + 6}",
            f"--runtime-env-agent-port={p + 7}",
            f"--min-worker-port={p + 10}",
            f"--max-worker-port={p + PORTS_PER_NODE - 1}",
            "--disable-usage-stats",
            "--block",
        ]
        if index == 0:
            args += [
                "--head",
                f"--port={p}",
                f"--dashboard-port={p + 1}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--ray-client-server-port={p + 8}",
            ]
        else:
            args.append(f"--address={self.gcs_address}")
        return args

    def _place(self) -> None:
        """Fresh ports and a fresh temp dir for one attempt at starting the cluster."""
        self.base = _port_block(PORTS_PER_NODE * len(self.nodes))
        self.gcs_address = f"127.0.0.1:{self.base}"
        self.dashboard_url = f"http://127.0.0.1:{self.base + 1}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="atesd-rc-", dir="/tmp"))
        self.procs = []

    def start(self, timeout_s: float = 180.0, attempts: int = 3) -> LocalCluster:
        """Start the head, then the other nodes. A raylet that waits too long for its helper
        processes aborts (which happens on an overloaded machine), so the cluster gets a few tries."""
        for attempt in range(attempts):
            self._place()
            try:
                self._start_nodes(timeout_s)
                return self
            except BaseException as err:
                self.stop()
                if attempt == attempts - 1 or not isinstance(err, NodeStartError):
                    raise
        return self

    def _start_nodes(self, timeout_s: float) -> None:
        for i, name in enumerate(self.nodes):
            proc = self._start_node(i, name)
            if i == 0 and (Path.home() / ".ray" / "auth_token").exists():
                # a head finding a token turns token authentication on (unless RAY_AUTH_MODE says
                # otherwise): the other nodes and the CLI must present it too
                self.env.setdefault("RAY_AUTH_MODE", "token")
            up = self._wait(proc, name, lambda n=i + 1: self._alive_nodes() == n, timeout_s)
            _renice(proc.pid, 0)
            if not up:
                raise NodeStartError(
                    f"ray node {name} exited: {(self.temp_dir / f'{name}.log').read_text()[-3000:]}"
                )

    def _start_node(self, index: int, name: str) -> subprocess.Popen:
        log = open(self.temp_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [RAY, "start", *self._node_args(index), f"--resources={json.dumps({name: self.nodes[name]})}"]
        # each node runs in a directory of its own, not the caller's: a job driver's working directory
        # goes on every worker's sys.path, which on one machine would hand this checkout to them all
        home = self.temp_dir / f"{name}-cwd"
        home.mkdir(exist_ok=True)
        proc = subprocess.Popen(
            cmd,
            cwd=home,
            env=self.env | self.node_env.get(name, {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_start_priority,
        )
        self.procs.append(proc)
        return proc

    def _wait(self, proc: subprocess.Popen, name: str, ready, timeout_s: float) -> bool:
        """True once ``ready()``; False if the node's process exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(1.0)
        raise TimeoutError(f"ray node {name} not up within {timeout_s:.0f} s (logs in {self.temp_dir})")

    def _alive_nodes(self) -> int:
        out = subprocess.run(
            [RAY, "status", f"--address={self.gcs_address}"], env=self.env, capture_output=True, text=True
        )
        if out.returncode != 0:
            return 0
        return sum(1 for line in out.stdout.splitlines() if line.strip().startswith("1 node_"))

    def run(
        self, *args: str, cwd: str | Path | None = None, timeout_s: float = 600
    ) -> subprocess.CompletedProcess:
        """A command with this cluster's environment (PATH, token mode)."""
        return subprocess.run(
            list(args), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s
        )

    def kill_node(self, name: str) -> None:
        """SIGKILL a node and everything it started (its process group), as a machine that is lost."""
        proc = self.procs[list(self.nodes).index(name)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart_node(self, name: str, timeout_s: float = 180.0) -> None:
        """Start a killed node again, on its own ports and resources."""
        index = list(self.nodes).index(name)
        alive = self._alive_nodes()
        self.procs[index] = proc = self._start_node(index, name)
        self.procs.pop()  # _start_node appended it
        if not self._wait(proc, name, lambda: self._alive_nodes() > alive, timeout_s):
            raise NodeStartError(
                f"ray node {name} did not come back: {(self.temp_dir / f'{name}.log').read_text()[-3000:]}"
            )

    def stop(self) -> None:
        """SIGTERM each ``ray start --block`` (it stops the node's processes), then SIGKILL what is left."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def driven(nodes: LocalCluster):
    """Start ``nodes`` and make this process a driver on them; stop both at the end and restore the
    environment variables Ray's start-up sets. The nodes run with token authentication (Ray's default
    once ~/.ray/auth_token exists); a driver joining an explicit address must turn it on itself, as
    ``RAY_AUTH_MODE=token`` would at start-up."""
    import ray
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    from atesd_ray.runtime.cluster import _runtime_env_for_checkout

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    try:
        nodes.start()
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        ray.init(address=nodes.gcs_address, runtime_env=_runtime_env_for_checkout(), log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
