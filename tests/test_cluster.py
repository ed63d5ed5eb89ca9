"""Ray across nodes, on this machine: two ``ray start`` nodes on 127.0.0.1 (tests/local_cluster.py).

- joining: an unreachable address is refused before ray.init (which retries for minutes), naming it;
- placement: ranks in node order, STRICT_SPREAD over both nodes, the same order on a new placement,
  colocated roles sharing bundles;
- ``ray job submit --working-dir . --runtime-env runtime_env.yaml``: the packages and Hydra's
  ``pkg://conf`` resolve from the upload on both nodes; a 2-point multirun of 2-step tiny jobs in
  one submitted driver puts the student ranks on both nodes, syncs weights by a bucketed broadcast
  across nodes, and leaves no actors or placement groups behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.util.state import list_actors, list_placement_groups

from atesd_ray.config import RoleResources
from atesd_ray.runtime.cluster import ActorGroup, Placement
from tests.conftest import TINY
from tests.local_cluster import LocalCluster, driven, python_without_package

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RUN_CLASSES = {"StudentRank", "RolloutWorker", "TeacherWorker", "ExposureController"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes (3 CPUs each, resources node_a / node_b) and this process as a driver on them.
    node_b's Python has no path to this project, as a machine whose image lacks it: only what a
    job's runtime env carries (the uploaded working dir) gives its workers the code."""
    bare = python_without_package(tmp_path_factory.mktemp("python-without-package"))
    with driven(
        LocalCluster({"node_a": 4, "node_b": 4}, cpus_per_node=3, node_env={"node_b": bare})
    ) as nodes:
        yield nodes


def _submit(cluster: LocalCluster, *entrypoint: str, timeout_s: float = 540) -> subprocess.CompletedProcess:
    """`ray job submit` of this checkout, the way the README shows it (Ray shell-quotes the entrypoint)."""
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        f"--address={cluster.dashboard_url}", "--working-dir=.", "--runtime-env=runtime_env.yaml",
        "--", *entrypoint,
    ]  # fmt: skip
    return cluster.run(*cmd, cwd=ROOT, timeout_s=timeout_s)


class Where:
    """A probe actor: which node it runs on."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


CONNECT = """
import json, os, sys
from atesd_ray.config import ClusterConfig
from atesd_ray.runtime.cluster import ClusterError, connect
out = {}
for case, address in (("address", sys.argv[1]), ("dashboard", "http://127.0.0.1:8265"), ("env", None)):
    if address is None:
        os.environ["RAY_ADDRESS"] = sys.argv[1]
    try:
        connect(ClusterConfig(address=address, connect_timeout_s=5))
        out[case] = {"error": None}
    except ClusterError as err:
        out[case] = {"error": str(err)}
print(json.dumps(out))
"""


def _dead_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # free once the socket closes: nothing listens


def test_unreachable_address_fails_at_once_naming_the_address(tmp_path):
    address = _dead_address()
    out = subprocess.run(
        [sys.executable, "-c", CONNECT, address], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cases = json.loads(out.stdout.strip().splitlines()[-1])
    for case in ("address", "env"):
        # refused by the socket check before ray.init (which retries for minutes): no wait involved
        assert address in cases[case]["error"] and "Connection refused" in cases[case]["error"], cases[case]
    assert "dashboard" in cases["dashboard"]["error"] and "ray job submit" in cases["dashboard"]["error"]

    entry = subprocess.run(
        [sys.executable, "-m", "atesd_ray.main", *TINY, f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}",
         f"cluster.address={address}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert entry.returncode != 0
    assert f"cannot reach the Ray cluster at '{address}'" in entry.stderr
    # the entry point connects before loading data or building actors
    assert "data synthetic" not in entry.stdout + entry.stderr and "RolloutWorker" not in entry.stderr


def test_placement_orders_ranks_by_node_and_spreads(cluster):
    one_cpu = RoleResources(cpus=1)
    spread = ActorGroup(Where, 2, one_cpu, "STRICT_SPREAD", "t-spread", lambda i: ((), {}))
    packed = ActorGroup(Where, 4, one_cpu, "PACK", "t-pack", lambda i: ((), {}))
    try:
        spread_nodes = ray.get(spread.call("node"))
        assert len(set(spread_nodes)) == 2 and spread_nodes == [n["node_id"] for n in spread.nodes]
        packed_nodes = ray.get(packed.call("node"))
        # 4 one-CPU bundles on two nodes with 2 CPUs free each (the spread group holds one): 2 + 2, the
        # ranks of one node consecutive, in node order
        assert packed_nodes == sorted(packed_nodes) == [n["node_id"] for n in packed.nodes]
        assert [packed_nodes.count(n) for n in sorted(set(packed_nodes))] == [2, 2]
    finally:
        spread.shutdown()
        packed.shutdown()
    again = Placement("t-spread-again", 2, {"CPU": 1}, "STRICT_SPREAD")
    assert [n["node_id"] for n in again.nodes] == spread_nodes  # same rank order on a new placement
    again.remove()
    states = {
        pg["name"]: pg["state"] for pg in list_placement_groups(address=cluster.dashboard_url, limit=1000)
    }
    assert all(states[name] == "REMOVED" for name in ("t-spread", "t-pack", "t-spread-again"))


def test_colocated_roles_share_bundles(cluster):
    shared = Placement("t-coloc", 2, {"CPU": 2}, "STRICT_SPREAD")
    one_cpu = RoleResources(cpus=1)
    students = ActorGroup(
        Where, 2, one_cpu, "STRICT_SPREAD", "t-coloc-s", lambda i: ((), {}), placement=shared
    )
    rollouts = ActorGroup(
        Where, 2, one_cpu, "STRICT_SPREAD", "t-coloc-r", lambda i: ((), {}), placement=shared
    )
    try:
        s_nodes, r_nodes = ray.get(students.call("node")), ray.get(rollouts.call("node"))
        assert s_nodes == r_nodes and len(set(s_nodes)) == 2
    finally:
        students.shutdown()
        rollouts.shutdown()
    assert not shared.removed  # the groups only borrowed it
    shared.remove()


UPLOAD_CHECK = """
import importlib, json, ray
from hydra import compose, initialize_config_module
from atesd_ray.config import register_schemas, to_config
MODULES = ("atesd_ray", "workers", "controller", "conf", "controller.actor", "atesd_ray.main")
files = lambda: {m: importlib.import_module(m).__file__ for m in MODULES}
register_schemas()
with initialize_config_module("conf", version_base=None):
    algorithm = to_config(compose("config", overrides=["experiment=paper_atesd"])).algorithm.name
ray.init()
where = ray.remote(num_cpus=0)(lambda: (ray.get_runtime_context().get_node_id(), files()))
remote = ray.get([where.options(resources={r: 1}).remote() for r in ("node_a", "node_b")])
print("RESULT " + json.dumps({"driver": files(), "algorithm": algorithm, "nodes": remote}))
"""


def test_working_dir_upload_resolves_packages_on_both_nodes(cluster):
    out = _submit(cluster, "python", "-c", UPLOAD_CHECK)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["algorithm"] == "atesd"
    assert len({node for node, _ in result["nodes"]}) == 2
    for files in [result["driver"], *(f for _, f in result["nodes"])]:
        for module, path in files.items():
            assert "runtime_resources/working_dir_files" in path, f"{module} came from {path}, not the upload"


def test_multirun_on_two_nodes_leaves_nothing_behind(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    out = _submit(
        cluster,
        "python", "-m", "atesd_ray.main", "-m", *TINY,
        "algorithm=fixed_exposure", "algorithm.alpha=0,1",
        f"run_dir={sweep}", "tracking.experiment=sweep",
        "trainer.ranks=2", "cluster.student_strategy=STRICT_SPREAD",
        "trainer.weight_transport=collective", "trainer.weight_bucket_mb=1",
        # each job takes 4 of the 6 CPUs: a job that left its placement groups behind starves the next
        "cluster.placement_timeout_s=90",
    )  # fmt: skip
    log = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, log

    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 2, log
    for run, alpha in zip(runs, (0.0, 1.0), strict=True):
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1] and {m["alpha"] for m in metrics} == {alpha}
        assert all(m["weight_version"] == m["step"] + 1 for m in metrics)
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["run_dir"] == str(run) and config["tracking"]["experiment"] == f"sweep/{run.name}"
        students = json.loads((run / "topology.json").read_text())["student"]
        assert [s["rank"] for s in students] == [0, 1]
        assert len({s["node_id"] for s in students}) == 2, students  # one rank on each node

    actors = list_actors(address=cluster.dashboard_url, limit=10000)
    ours = [a for a in actors if a["class_name"] in RUN_CLASSES]
    assert len(ours) >= 2 * 5  # per job: 2 student ranks, rollout, teacher, controller
    assert [a for a in ours if a["state"] != "DEAD"] == []
    groups = [
        g
        for g in list_placement_groups(address=cluster.dashboard_url, limit=10000)
        if g["name"].startswith("atesd-")
    ]
    assert len(groups) >= 2 * 3 and [g for g in groups if g["state"] != "REMOVED"] == []


def test_a_job_whose_runtime_env_lacks_the_package_is_refused_naming_the_node(cluster, tmp_path):
    """Submitted without ``--working-dir``: the driver on the head imports the installed copy, but
    node_b has none; the run stops before building an actor, naming node_b and the fix."""
    node_b = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_b" in n["Resources"])
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", f"--address={cluster.dashboard_url}",
        "--", "python", "-m", "atesd_ray.main", *TINY, f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    out = cluster.run(*cmd, cwd=tmp_path, timeout_s=300)
    said = out.stdout + out.stderr
    assert out.returncode != 0, said[-3000:]
    assert "cannot import this code" in said and f"(id {node_b[:12]})" in said, said[-3000:]
    assert "No module named 'atesd_ray'" in said and "--working-dir . --runtime-env runtime_env.yaml" in said
    assert "node_a" not in said.split("cannot import this code")[1].split(". The job")[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
