"""Every role's models stay on the device its actor reports, from construction through each kind of
weight sync (object store, collective, the CUDA IPC chain on CPU buffers), with the sync check exact.
On this CPU machine the device is the CPU; the same code puts them on the GPU Ray reserved (the
GPU half is ``make gpu-check``). Beside tests/test_gpu_path.py, which needs a cluster of its own."""

from __future__ import annotations

import dataclasses

import pytest
import ray

from tests.conftest import TINY, make_config


def _role_devices(actors) -> dict[str, set[str]]:
    def devices(worker):
        model = worker.model if hasattr(worker, "model") else worker.engine.model
        return {str(worker.device), *(str(p.device) for p in model.parameters())}

    return {
        "student": ray.get(actors.students.actors[0].__ray_call__.remote(devices)),
        "rollout": ray.get(actors.rollouts.actors[0].__ray_call__.remote(devices)),
        "teacher": ray.get(actors.teachers.actors[0].__ray_call__.remote(devices)),
    }


@pytest.mark.ray
def test_every_role_keeps_its_models_on_its_device_through_every_kind_of_sync(ray_cluster):
    """Built, then after an object-store, a collective and a CUDA IPC sync (its chain, on CPU buffers)
    into the HF rollout and a live teacher, every role's parameters sit on the device its actor
    reports (here the CPU: the same code puts them on the reserved GPU)."""
    from atesd_ray.algorithms import build_actors
    from atesd_ray.algorithms.base import launch_rollouts
    from atesd_ray.data.synthetic import generate
    from atesd_ray.runtime.weight_sync.collective import CollectiveSync
    from atesd_ray.runtime.weight_sync.cuda_ipc import CudaIpcSync

    cfg = make_config(*TINY, "teacher.weights=live", "trainer.lr=1e-2")
    actors = build_actors(cfg, total_steps=4, name="test-devices")
    try:
        assert _role_devices(actors) == {"student": {"cpu"}, "rollout": {"cpu"}, "teacher": {"cpu"}}
        records = [dataclasses.asdict(r) for r in generate(2, seed=3)]
        receivers = actors.rollouts.actors + actors.teachers.actors
        transports = [
            actors.weight_sync,
            CollectiveSync(actors.students, receivers, "gloo", bucket_bytes=1 << 16),
            CudaIpcSync(actors.students, actors.rollouts.actors, "gloo", bucket_bytes=1 << 16),
        ]
        for step, sync in enumerate(transports):
            if step:
                sync.setup()
            rollouts = launch_rollouts(actors, records, step, min_version=step)
            scored = [actors.teachers.actors[0].score.remote(r, 1.0) for r in rollouts]
            actors.students.train_step(step, rollouts, scored).get()
            sync.sync(step + 1).get()
            gaps = ray.get(sync.verify())
            assert all(g is not None and g < 1e-5 for g in gaps), (sync.name, gaps)
            assert _role_devices(actors) == {"student": {"cpu"}, "rollout": {"cpu"}, "teacher": {"cpu"}}
            if step:
                sync.teardown()
    finally:
        actors.shutdown()
