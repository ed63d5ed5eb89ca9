"""The config's rules about the teacher: its context and signal transforms, the engine that scores,
the LoRA adapter served by a vLLM rollout, the teacher models' tokenizers (``Config.check`` runs them)."""

from __future__ import annotations

from atesd_ray.config.model import ModelConfig, model_preset
from atesd_ray.config.training import LossConfig, RolloutConfig, TeacherConfig
from atesd_ray.schema import require


def check_teacher(
    model: ModelConfig, rollout: RolloutConfig, teacher: TeacherConfig, loss: LossConfig
) -> None:
    signal = teacher.signal
    scorer = rollout.engine if teacher.engine == "rollout" else teacher.engine  # Config.teacher_engine
    if signal.contrast != "none":
        require(
            loss.kind != "sampled_token" and loss.topk_tail != "none",
            "teacher.signal.contrast",
            f"the contrast is a target distribution over the teacher's support (q ∝ p_S·(p_T/p_N)^λ); "
            f"algorithm.loss.kind={loss.kind} with topk_tail={loss.topk_tail} uses no such distribution: "
            "use kind jsd or topk with topk_tail renormalize or bucket",
        )
    peers = [f"teacher.context={teacher.context}"] if teacher.context == "hindsight" else []
    if signal.contrast == "wrong_hint":
        peers.append("teacher.signal.contrast=wrong_hint")
    require(
        not peers or rollout.n_samples >= 2,
        "rollout.n_samples",
        f"{' and '.join(peers)} read(s) another rollout of the same problem from the same step: "
        f"set rollout.n_samples >= 2 (got {rollout.n_samples})",
    )
    require(
        teacher.vllm.lora == "merged",
        "teacher.vllm.lora",
        "a vLLM teacher takes merged weights (a live teacher) or none (a frozen one); the adapter "
        "choice is the rollout's: rollout.vllm.lora",
    )
    if rollout.vllm.lora == "adapter":
        lora = model.lora
        require(
            lora.enabled and rollout.engine == "vllm",
            "rollout.vllm.lora",
            "rollout.vllm.lora=adapter serves the student as a LoRA adapter on a vLLM rollout: it needs "
            f"model.lora.enabled=true and rollout.engine=vllm (got {lora.enabled}, {rollout.engine})",
        )
        outside = sorted({"lm_head", "embed_tokens"} & set(lora.target_modules))
        require(
            lora.r <= 512 and not outside,
            "model.lora",
            f"vLLM serves adapters of rank <= 512 on the decoder's linear layers; got r={lora.r}"
            + (f" and target_modules {outside}" if outside else ""),
        )
        require(
            not (teacher.engine == "vllm" and teacher.weights == "live"),
            "teacher.engine",
            "a live vLLM teacher takes merged weights while rollout.vllm.lora=adapter takes the adapter, "
            "and a sync carries one format: use teacher.engine=rollout (the teacher on the rollout's "
            "engine, the adapter on) or teacher.engine=hf",
        )
    if teacher.engine == "rollout" and teacher.weights == "frozen":
        require(
            model.lora.enabled,
            "teacher.engine",
            "teacher.engine=rollout with a frozen teacher is the rollout's network with the LoRA adapter "
            "off, the step-0 model: it needs model.lora.enabled=true (without LoRA the rollout holds no "
            "step-0 weights; use teacher.engine=hf)",
        )
        require(
            rollout.engine == "hf" or rollout.vllm.lora == "adapter",
            "teacher.engine",
            "teacher.engine=rollout with a frozen teacher switches the LoRA adapter off on the rollout "
            "engines; a vLLM rollout holds merged weights unless rollout.vllm.lora=adapter",
        )
    if scorer == "vllm":
        t = teacher
        require(
            t.topk > 0,
            "teacher.topk",
            "a vLLM teacher returns top-k prompt logprobs; set teacher.topk > 0",
        )
        require(
            t.weights != "ema", "teacher.weights", "a vLLM teacher cannot keep an EMA; use frozen or live"
        )
        require(
            t.signal.plain,
            "teacher.signal",
            "teacher.signal needs the teacher's full log-probs at every position (the contrast gathers "
            "a second pass at the first pass's top-k ids, the gate takes the exact entropy); vLLM's "
            "prompt logprobs give the top-k only: use teacher.engine=hf",
        )
    for name in teacher.models():
        family = model_preset(name).tokenizer_family
        require(
            family is None or model.tokenizer_family is None or family == model.tokenizer_family,
            "teacher.routes" if name != teacher.model else "teacher.model",
            f"teacher model {name} has the {family} tokenizer and the student {model.name} the "
            f"{model.tokenizer_family} one: per-token targets need the same token ids",
        )
