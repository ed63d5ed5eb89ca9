"""A node lost for good, on a real two-node Ray cluster: the run's rollout needs a resource only
node_b has (``+cluster.rollout.resources.node_b=1``; weights by the collective transport, whose
group the lost rollout never leaves), and node_b is killed mid-run. The run says
what it waits for while the rollout cannot be placed again, ends within the placement timeout with
the project's own error (naming the actor, its resources and the checkpoint kept), and once node_b
is back the same run resumes and equals a run left alone, step for step."""

from __future__ import annotations

import json
import threading
import time

import pytest

from atesd_ray.assembly import TEARDOWN_WAIT_S
from atesd_ray.faults import ActorsLost
from atesd_ray.modes.train import run
from atesd_ray.soak import differences
from tests.conftest import TINY, make_config
from tests.local_cluster import LocalCluster, driven

pytestmark = pytest.mark.ray

TIMEOUT_S = 20


@pytest.fixture(scope="module")
def two_nodes():
    with driven(LocalCluster({"node_a": 4, "node_b": 4}, cpus_per_node=3)) as nodes:
        yield nodes


def _config(two_nodes, run_dir):
    return make_config(
        *TINY,
        "trainer.total_steps=4",
        "trainer.save_every=1",
        "trainer.lr=1e-3",
        "trainer.weight_transport=collective",  # a member on the lost node never leaves the group
        "cluster.student.cpus=1",
        "cluster.rollout.cpus=1",
        "cluster.teacher.cpus=1",
        "+cluster.rollout.resources.node_b=1",
        "+cluster.student.resources.node_a=1",
        f"cluster.placement_timeout_s={TIMEOUT_S}",
        f"cluster.address={two_nodes.gcs_address}",
        f"run_dir={run_dir}",
    )


def _lines(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_lost_node_ends_the_run_with_its_resources_named_and_it_resumes_once_back(two_nodes, tmp_path):
    reference = tmp_path / "reference"
    run(_config(two_nodes, reference), reference)

    lost = tmp_path / "lost"
    killed = threading.Event()
    killed_at = []

    def kill_after_the_first_step():
        while len(_lines(lost)) < 1:
            time.sleep(0.2)
        two_nodes.kill_node("node_b")
        killed_at.append(time.monotonic())
        killed.set()

    threading.Thread(target=kill_after_the_first_step, daemon=True).start()
    with pytest.raises(ActorsLost) as err:
        run(_config(two_nodes, lost), lost)
    assert killed.is_set()
    # bounded: the wait for placement, then the teardown's wait for the group's members
    assert time.monotonic() - killed_at[0] < TIMEOUT_S + TEARDOWN_WAIT_S + 30
    message = str(err.value)
    assert "rollout 0 (needs {'CPU': 1.0, 'node_b': 1.0})" in message
    assert f"within {TIMEOUT_S} s" in message and f"{lost}/checkpoints is kept" in message
    # what it says while it waits depends on when the node's death is seen (the rollout can answer
    # once more, then hold up the weight group's rendezvous): tests/test_reliability.py checks the lines

    two_nodes.restart_node("node_b")
    run(_config(two_nodes, lost), lost)  # the same command: it resumes from the last checkpoint
    assert differences(_lines(reference), _lines(lost)) == []
