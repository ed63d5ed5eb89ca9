"""The run's surroundings: evaluation, the cluster, tracking, the live page, and the other modes'
settings (sweep, report, export)."""

from __future__ import annotations

from dataclasses import dataclass

from atesd_ray.config.data import DATA_SOURCES
from atesd_ray.schema import (
    Section,
    between,
    non_negative,
    one_of,
    positive,
    require,
    setting,
    subkey,
)

PAPER_MODELS = ("qwen3_1_7b", "qwen3_4b", "qwen3_8b")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class EvalSetConfig(Section):
    name: str = "synthetic"
    source: str = setting("synthetic", one_of(*DATA_SOURCES))
    path: str | None = None
    subset: str | None = None
    split: str = "test"
    columns: dict[str, str] = setting({})

    def check(self, key: str) -> None:
        if self.source != "synthetic":
            require(bool(self.path), subkey(key, "path"), f"source={self.source} needs a path")


@dataclass
class EvalConfig(Section):
    name: str = "synthetic"
    sets: list[EvalSetConfig] = setting([EvalSetConfig()])
    model: str | None = None  # mode=eval: hub id, local path or checkpoint dir; None: the configured model
    samples: int = setting(1, positive)  # k of Average@k
    temperature: float = setting(1.0, non_negative)
    top_p: float = setting(1.0, between(0.0, 1.0))
    top_k: int = 0
    max_new_tokens: int = setting(38912, positive)
    thinking: bool = True
    max_problems: int | None = None
    every_n_steps: int = setting(0, non_negative)  # periodic eval during training; 0 disables
    at_start: bool = False  # evaluate before the first training step (mode=train)
    at_end: bool = False  # and after the last
    grade_timeout_s: float = setting(5.0, positive)
    chunk_problems: int = setting(
        32, positive
    )  # problems per rollout call: the unit of progress (and of load balance)

    def check(self, key: str) -> None:
        names = [s.name for s in self.sets]
        require(
            bool(names) and len(set(names)) == len(names),
            subkey(key, "sets"),
            f"needs at least one set, with unique names; got {names}",
        )


@dataclass
class RoleResources(Section):
    """What each actor of a role reserves, and so its torch threads (``cluster.torch_threads``
    overrides). null sizes it to the machine the driver runs on (``cluster=local``,
    ``atesd_ray/runtime/devices.py``): cpus, one CPU reserved and the machine's cores as threads
    (a student rank its share); gpus, one per actor when there is one for each, else shared."""

    cpus: float | None = setting(1.0, non_negative)
    gpus: float | None = setting(0.0, non_negative)
    # extra Ray custom resources each actor of the role needs, e.g. {"node_b": 1}
    resources: dict[str, float] = setting({})


@dataclass
class ClusterConfig(Section):
    name: str = "local"
    address: str | None = None  # None: $RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = None  # local instance size; None: the machine's cores
    connect_timeout_s: float = setting(15.0, positive)
    torch_threads: int | None = setting(None, positive)  # per actor; None: see RoleResources
    student: RoleResources = setting(RoleResources)
    rollout: RoleResources = setting(RoleResources)
    teacher: RoleResources = setting(RoleResources)
    student_strategy: str = setting("PACK", one_of(*STRATEGIES))
    rollout_strategy: str = setting("SPREAD", one_of(*STRATEGIES))
    teacher_strategy: str = setting("SPREAD", one_of(*STRATEGIES))
    # rollout replica i shares student rank i's placement bundle (its node and, on GPU, its device);
    # needs rollout.replicas == trainer.ranks
    colocate_rollout: bool = False
    placement_timeout_s: float = setting(300.0, positive)

    def check(self, key: str) -> None:
        if self.colocate_rollout and self.student.gpus:
            require(
                0 < self.rollout.gpus and self.student.gpus + self.rollout.gpus <= 1,
                subkey(key, "rollout.gpus"),
                f"colocated roles share one GPU: student.gpus ({self.student.gpus}) + rollout.gpus "
                f"({self.rollout.gpus}) must be <= 1, each > 0 (e.g. 0.5 and 0.5)",
            )


@dataclass
class TrackingConfig(Section):
    backends: list[str] = setting(
        ["console", "jsonl", "tensorboard"], each=[one_of("console", "jsonl", "tensorboard", "wandb")]
    )
    project: str = "atesd-ray"
    experiment: str | None = None  # None: derived from the run directory
    # the probe NLL (the student's NLL of the probe set's references) is logged every this many steps
    # and at the last; every step whatever this says when the exposure controller learns from it
    probe_every: int = setting(1, positive)


@dataclass
class DashboardConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = setting(8471, between(0, 65535))  # 0: any free port


@dataclass
class SweepConfig(Section):
    """``mode=sweep_exposure``: the fixed-exposure mismatch diagnostic."""

    alphas: list[float] = setting(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        lambda v: None if len(v) > 0 else "needs at least one exposure",
        each=[between(0.0, 1.0)],
    )
    problems: int = setting(16, positive)


@dataclass
class ReportConfig(Section):
    """``mode=report``: run directories to gather into one table."""

    # run directories holding eval/summary.json, each optionally labelled: "OPSD=runs/opsd-eval"
    runs: list[str] = setting([])
    output: str | None = None  # directory for report.md / report.json; None: the run directory
    # add the paper's main-table rows (DESIGN §4) for these models
    paper_rows: list[str] = setting([], each=[one_of(*PAPER_MODELS)])


@dataclass
class LoggingConfig(Section):
    """The console: ``info`` shows the project's own lines and warnings (libraries: errors only, no
    progress bars inside actors); ``debug`` (or ``--verbose``) everything the libraries log."""

    level: str = setting("info", one_of("debug", "info", "warning"))


@dataclass
class ExportConfig(Section):
    """``mode=export``: a checkpoint of ``run_dir`` as a Hugging Face model folder."""

    step: int | None = None  # None: the latest complete checkpoint
    out: str | None = None  # None: <checkpoint>/huggingface
