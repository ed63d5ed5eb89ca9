"""The training step's parts: the loss, the exposure controller, the rollout and teacher engines,
the trainer."""

from __future__ import annotations

from dataclasses import dataclass

from atesd_ray.config.model import ModelConfig, model_preset, model_presets
from atesd_ray.schema import (
    Section,
    at_least,
    between,
    non_negative,
    one_of,
    positive,
    require,
    setting,
    subkey,
)


@dataclass
class LossConfig(Section):
    """The distillation loss (``atesd_ray/losses.py``). verl's ``forward_kl_topk`` with its defaults is
    ``beta: 0, topk_tail: none, teacher_temperature: 1, logprob_floor: -10, token_max: 10, clip: null``."""

    kind: str = setting("jsd", one_of("jsd", "topk", "sampled_token"))
    beta: float = setting(0.0, between(0.0, 1.0))  # 0: forward KL(p_T || p_S); 1: reverse KL
    temperature: float = setting(1.1, positive)  # the student's logits are divided by it
    # the teacher's log-probs are at this temperature; null: `temperature` (OPSD's); verl scores its teacher at 1
    teacher_temperature: float | None = setting(None, positive)
    clip: float | None = setting(0.05, positive)  # point-wise clip per (token, vocab entry); null disables
    # on the teacher's top-k: renormalize both sides over the k ids (OPSD), add one bucket for the rest
    # (an exact divergence of the coarsened distributions), or none (verl: the top-k terms alone)
    topk_tail: str = setting("renormalize", one_of("renormalize", "bucket", "none"))
    logprob_floor: float | None = (
        None  # topk_tail=none: both sides' top-k log-probs clamped below (verl: -10)
    )
    token_max: float | None = setting(
        None, positive
    )  # topk_tail=none: each token's loss clamped above (verl: 10)
    chunk_size: int = setting(256, positive)

    @property
    def teacher_t(self) -> float:
        """The temperature of the teacher's log-probs."""
        return self.temperature if self.teacher_temperature is None else self.teacher_temperature

    def check(self, key: str) -> None:
        if self.topk_tail == "none":
            require(
                self.beta == 0.0 and self.kind != "sampled_token",
                subkey(key, "topk_tail"),
                f"topk_tail=none is verl's forward KL over the teacher's top-k: it needs beta=0 and kind jsd or "
                f"topk (got beta={self.beta}, kind={self.kind})",
            )
        else:
            require(
                self.logprob_floor is None and self.token_max is None,
                subkey(key, "logprob_floor"),
                "logprob_floor and token_max are verl's clamps of topk_tail=none",
            )


@dataclass
class ControllerConfig(Section):
    kind: str = setting("fixed", one_of("fixed", "atesd", "random", "linear"))
    alpha_min: float = setting(0.1, between(0.0, 1.0))
    alpha_max: float = setting(1.0, between(0.0, 1.0))
    hold: int = setting(4, at_least(1, "the hold window must be >= 1"))  # H: student updates per decision
    lookahead: int = setting(8, at_least(1))  # L
    gamma: float = setting(0.9, between(0.0, 1.0))
    lambda_gt: float = setting(0.2, non_negative)
    # B: finished decisions per REINFORCE update
    batch_decisions: int = setting(4, at_least(2, "z-scored advantages need >= 2 decisions"))
    hidden: int = setting(64, positive)
    lr: float = setting(1e-3, positive)
    entropy_coef: float = setting(0.01, non_negative)
    entropy_target: float = -1.0  # nats; only entropy above this is penalized
    feature_ema: float = setting(0.9, between(0.0, 1.0))
    feature_clip: float = setting(5.0, positive)  # standardized features are clipped to +-this
    reward: str = setting("full", one_of("full", "immediate", "short", "lp_only"))
    # ℓ of the learning-progress reward: the probe NLL of the references, the full-exposure teacher's
    # KL to the student on fixed probe rollouts, or the distillation loss (README, "The exposure controller")
    progress_signal: str = setting("probe_nll", one_of("probe_nll", "probe_kl", "loss"))
    granularity: str = setting("batch", one_of("batch", "example"))
    linear_start: float = setting(0.1, between(0.0, 1.0))  # kind=linear: alpha at step 0 ...
    linear_end: float = setting(1.0, between(0.0, 1.0))  # ... and at the last step
    seed: int | None = None  # None: the run's seed

    @property
    def scores_decisions(self) -> bool:
        """Every kind but ``fixed`` scores its decisions (G_lp + λ_gt·G_gt)."""
        return self.kind != "fixed"

    def check(self, key: str) -> None:
        require(
            self.alpha_min <= self.alpha_max,
            subkey(key, "alpha_min"),
            f"alpha_min={self.alpha_min} exceeds alpha_max={self.alpha_max}",
        )
        if self.granularity == "example":
            kind_key = f"{subkey(key, 'kind')} (with {subkey(key, 'granularity')}=example)"
            require(
                self.kind in ("atesd", "random"),
                kind_key,
                f"got {self.kind!r}; allowed values: atesd, random",
            )


ENGINES = ("hf", "vllm")


@dataclass
class VLLMConfig(Section):
    """A vLLM engine's settings (``rollout.vllm``, ``teacher.vllm``; used with ``engine: vllm``)."""

    # None: eager on the CPU (torch.compile's warm-up costs ~150 s there for ~10% faster sampling),
    # compiled with CUDA graphs on a GPU
    enforce_eager: bool | None = None
    # KV cache per engine in MiB; null: gpu_memory_utilization x the GPU's memory. vLLM's CPU
    # backend takes that fraction of host RAM per engine instead, so CPU runs set this.
    kv_cache_mb: int | None = setting(None, positive)
    gpu_memory_utilization: float = setting(0.5, lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]")
    # longest prompt + response; null: model.max_prompt_tokens + the longest generation configured
    max_model_len: int | None = setting(None, positive)
    max_num_seqs: int = setting(64, positive)
    # weight syncs reset it (KV computed with older weights is never reused)
    enable_prefix_caching: bool = True
    # with model.lora.enabled: merged (every weight, the adapter folded in, each sync) or adapter (the
    # engine holds the base once and serves the student as a LoRA adapter; a sync moves the adapter
    # alone, 2-4% of the merged bytes for the Qwen3 presets; vLLM's LoRA kernels cost time per token,
    # on its CPU backend plain torch: README "vLLM engines")
    lora: str = setting("merged", one_of("merged", "adapter"))


@dataclass
class RolloutConfig(Section):
    engine: str = setting("hf", one_of(*ENGINES))
    replicas: int = setting(1, positive)
    temperature: float = setting(1.1, positive)
    top_p: float = setting(0.95, between(0.0, 1.0))
    top_k: int = setting(20, non_negative)  # 0 disables
    max_new_tokens: int = setting(1024, positive)
    n_samples: int = setting(1, positive)  # responses per prompt
    stop: list[str] = setting(list)
    micro_batch: int = setting(16, positive)  # sequences generated together
    max_staleness: int = setting(0, one_of(0, 1))  # 1: generate batch t+1 while the student trains on batch t
    # the run stops when the token mean of |log p_rollout - log p_student| over a step's sampled
    # tokens exceeds this (a weight sync went wrong); null: the default for model.dtype
    # (atesd_ray/rollout_gap.py: 0.05 float32, 0.25 bfloat16/float16); inf: never
    max_logprob_gap: float | None = setting(None, positive)
    vllm: VLLMConfig = setting(VLLMConfig)


@dataclass
class SignalConfig(Section):
    """How the teacher's targets are transformed before the student distills them
    (``workers/teacher_signal.py``). Off by default, and then they cost no extra teacher pass.

    - ``contrast``: the student-anchored contrast of Purified OPSD (``reference_only``, arXiv
      2607.02234: the teacher on the reference without the question) or RLCSD (``wrong_hint``,
      2606.11709: the teacher on a wrong peer rollout of the same problem, same template): the target
      is q ∝ p_S · (p_T / p_N)^λ on the teacher's support, so what any hint does to the teacher alike
      cancels and only what the right context adds moves the student;
    - ``entropy_gate`` (EGRSD, 2605.13255): each token's loss weighed by
      w = floor + (1 - floor) · exp(-H_T / gate_temperature), H_T the teacher's entropy there.
    """

    contrast: str = setting("none", one_of("none", "reference_only", "wrong_hint"))
    contrast_weight: float = setting(1.0, positive)  # λ
    entropy_gate: bool = False
    gate_temperature: float = setting(1.0, positive)  # nats
    gate_floor: float = setting(0.1, between(0.0, 1.0))  # every token keeps at least this weight

    @property
    def plain(self) -> bool:
        return self.contrast == "none" and not self.entropy_gate


@dataclass
class TeacherConfig(Section):
    # hf: transformers forward passes (any top-k, full vocabulary, any temperature); vllm: prompt
    # logprobs of a vLLM engine (CPU or GPU), top-k only, see workers/vllm_engine.py; rollout: the
    # self-teacher scores on the rollout engines (HF, or vLLM serving the student as an adapter), the
    # LoRA adapter off for a frozen teacher and on for a live one: no teacher actors and no teacher
    # copy of the base weights
    engine: str = setting("hf", one_of(*ENGINES, "rollout"))
    # a model preset (conf/model/<name>.yaml) as a separate teacher, prompted like the student;
    # null: the student itself as the privileged self-teacher
    model: str | None = setting(None, one_of(model_presets))
    # multi-teacher OPD (verl's and NeMo-RL's): a problem whose record field `route_key` holds a value
    # named here is scored by that preset instead of teacher.model, one teacher group per model; the
    # field is the record's `source` by default (verl's data_source column: data.columns={source: data_source})
    routes: dict[str, str] = setting(dict)
    route_key: str = setting("source", one_of("source", "difficulty"))
    replicas: int = setting(1, positive)
    topk: int = setting(
        0, non_negative
    )  # logprobs sent per position; 0 (or >= vocab) sends the full distribution
    weights: str = setting("frozen", one_of("frozen", "live", "ema"))
    ema_decay: float = setting(0.999, between(0.0, 1.0))
    micro_batch: int = setting(8, positive)
    # what the privileged teacher reads before the student's tokens, exposed at α: the reference, or
    # a correct peer rollout of the same problem from the same step (hindsight self-distillation,
    # arXiv 2606.15576; the reference where no other sample of the problem is correct)
    context: str = setting("reference", one_of("reference", "hindsight"))
    signal: SignalConfig = setting(SignalConfig)
    vllm: VLLMConfig = setting(VLLMConfig)

    def model_config(self) -> ModelConfig | None:
        """The separate teacher model, or None for the privileged self-teacher."""
        return None if self.model is None else model_preset(self.model)

    def models(self) -> list[str]:
        """Every separate teacher model, teacher.model first: one teacher group each."""
        return list(dict.fromkeys([m for m in [self.model, *self.routes.values()] if m is not None]))

    def route(self, value: object) -> str | None:
        """The teacher model that scores a problem whose ``route_key`` field holds ``value``."""
        return self.routes.get(str(value), self.model)

    def check(self, key: str) -> None:
        if self.engine == "rollout":
            require(
                self.model is None and self.weights != "ema",
                subkey(key, "engine"),
                "teacher.engine=rollout scores with the student's own network on the rollout engines: it "
                f"serves the self-teacher (teacher.model null; got {self.model}), frozen or live (got {self.weights})",
            )
        for value, preset in self.routes.items():
            require(
                preset in model_presets(),
                subkey(key, f"routes.{value}"),
                f"got {preset!r}; allowed values: {', '.join(model_presets())}",
            )
        if self.routes:
            require(
                self.model is not None,
                subkey(key, "model"),
                "teacher.routes sends some problems to other teacher models; teacher.model scores the rest "
                "and must be set",
            )
            require(
                self.topk > 0,
                subkey(key, "topk"),
                "with teacher.routes each problem's targets come from its own teacher model, merged row by "
                "row: set teacher.topk > 0 (full-vocabulary rows of models with other output sizes do not merge)",
            )
        if self.model is not None:
            require(
                self.context == "reference" and self.signal.contrast == "none",
                subkey(key, "context" if self.context != "reference" else "signal.contrast"),
                f"a separate teacher model (teacher.model={self.model}) reads the student's prompt: it has no "
                "privileged context to choose or to contrast (teacher.context=reference, "
                "teacher.signal.contrast=none; the entropy gate applies)",
            )
            require(
                self.weights == "frozen",
                subkey(key, "weights"),
                f"a separate teacher model (teacher.model={self.model}) takes no student weights; "
                f"teacher.weights must be frozen, got {self.weights}",
            )


@dataclass
class TrainerConfig(Section):
    ranks: int = setting(1, positive)
    total_steps: int = setting(100, positive)
    prompts_per_step: int = setting(
        32, positive
    )  # x rollout.n_samples = the effective batch of one optimizer step
    micro_batch: int = setting(
        4, positive
    )  # sequences per forward/backward; gradients accumulate to the effective batch
    lr: float = setting(5e-6, at_least(0.0, "the learning rate must be >= 0"))
    weight_decay: float = setting(0.0, non_negative)
    betas: list[float] = setting([0.9, 0.999], lambda v: None if len(v) == 2 else "needs two values")
    grad_clip: float = setting(0.1, positive)
    lr_schedule: str = setting("constant", one_of("constant", "linear", "cosine"))
    warmup_steps: int = setting(0, non_negative)
    min_lr_ratio: float = setting(0.0, between(0.0, 1.0))
    save_every: int = setting(10, positive)
    keep_last: int = setting(3, positive)
    # each checkpoint also holds huggingface/: the student as a model folder, LoRA merged
    save_hf: bool = True
    # object_store | collective (gloo/NCCL broadcast) | cuda_ipc (colocated GPUs)
    weight_transport: str = setting("object_store", one_of("object_store", "collective", "cuda_ipc"))
    # collective / cuda_ipc: weights move in buckets of at most this size
    weight_bucket_mb: int = setting(512, positive)
    # a sync carries only the elements changed since the last one sent (runtime/weight_delta.py), and
    # every full_sync_every versions a full one; exact. Pays off in bf16 (a few % change per step)
    delta_sync: bool = False
    full_sync_every: int = setting(10, positive)
    # torch.distributed backend: auto (gloo on CPU, nccl on GPU), gloo, nccl
    backend: str = setting("auto", one_of("auto", "gloo", "nccl"))
    # actor faults (atesd_ray/runtime/faults.py): retries of one step after a replica restart, and
    # rollbacks to the last checkpoint without a step completed in between, before the run fails
    fault_retries: int = setting(3, non_negative)
