"""gpu-check, the torch part: what needs only PyTorch (CUDA), transformers and peft; no Ray."""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from types import SimpleNamespace

import torch

from atesd_ray.gpu_check.checks import check


def _loss_cfg(**kw):
    base = {
        "kind": "jsd",
        "beta": 0.0,
        "temperature": 1.1,
        "clip": None,
        "topk_tail": "renormalize",
        "chunk_size": 256,
    }
    return SimpleNamespace(**(base | kw))


def torch_part() -> None:
    from atesd_ray.losses import TeacherTargets, distill_loss
    from atesd_ray.rollout_gap import SamplerCut, sampler_logprobs
    from atesd_ray.runtime.transfer import backend_group, share

    gpu = torch.device("cuda", 0)

    @check("bf16 student step, Qwen3-shaped, LoRA r64")
    def _student_step():
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        model = Qwen3ForCausalLM(config).to(gpu, torch.bfloat16)
        model.gradient_checkpointing_enable()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=targets)
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6)
        ids = torch.randint(0, config.vocab_size, (4, 1024), device=gpu)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        hidden = (
            model.base_model.model.model(input_ids=ids)
            .last_hidden_state[:, 512:]
            .reshape(-1, config.hidden_size)
        )
        n = hidden.shape[0]
        teacher = TeacherTargets(
            torch.randn(n, 256, device=gpu).log_softmax(-1) - 1.0,
            torch.randint(0, config.vocab_size, (n, 256), device=gpu),
            torch.randn(n, device=gpu) - 3.0,
        )
        loss, _ = distill_loss(
            hidden, teacher, _loss_cfg(kind="topk", topk_tail="bucket"), project=model.get_output_embeddings()
        )
        (loss / n).backward()
        optimizer.step()
        torch.cuda.synchronize()
        assert math.isfinite(float(loss)), f"loss {float(loss)}"
        return {
            "tokens": n,
            "loss_per_token": float(loss) / n,
            "step_s": round(time.perf_counter() - t0, 3),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }

    @check("loss kernels on the GPU = float64 on the CPU")
    def _kernels():
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(300, 1000, generator=g, dtype=torch.float64) * 3
        t_full = (torch.randn(300, 1000, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
        top = t_full.topk(32)
        tokens = torch.randint(0, 1000, (300,), generator=g)
        worst = {}
        for name, targets, cfg in [
            ("jsd beta 0.5", TeacherTargets(t_full, None, t_full[:, 0]), _loss_cfg(beta=0.5)),
            (
                "top-k renormalize",
                TeacherTargets(top.values, top.indices, t_full[:, 0]),
                _loss_cfg(kind="topk"),
            ),
            (
                "top-k bucket",
                TeacherTargets(top.values, top.indices, t_full[:, 0]),
                _loss_cfg(kind="topk", topk_tail="bucket"),
            ),
        ]:
            ref, _ = distill_loss(logits, targets, cfg)
            got, _ = distill_loss(logits.float().to(gpu), targets.to(gpu), cfg)
            worst[name] = abs(float(got) - float(ref)) / max(1.0, abs(float(ref)))
        cut = SamplerCut(1.1, 20, 0.95)
        gap = (
            (
                sampler_logprobs(logits.float().to(gpu), tokens.to(gpu), cut).cpu().double()
                - sampler_logprobs(logits, tokens, cut)
            )
            .abs()
            .max()
        )
        worst["sampler cut"] = float(gap)
        assert max(worst.values()) < 1e-4, worst
        return {"relative_error": worst}

    @check("one-GPU NCCL group: the transport's construction, broadcast, abort")
    def _nccl():
        import torch.distributed as dist

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=60))
        group = backend_group("nccl", store, 0, 1, timedelta(seconds=60))
        t = torch.arange(1 << 20, device=gpu, dtype=torch.float32)
        options = dist.BroadcastOptions()
        options.rootRank = 0
        group.broadcast([t], options).wait()
        torch.cuda.synchronize()
        assert torch.equal(t, torch.arange(1 << 20, device=gpu, dtype=torch.float32))
        group.abort()
        return {}

    @check("CUDA IPC between two processes, opened on the receiver's device")
    def _ipc():
        ctx = torch.multiprocessing.get_context("spawn")
        handles, answers = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=_ipc_receiver, args=(handles, answers))
        child.start()
        buffer = (torch.arange(64 << 20, device=gpu) % 251).to(torch.uint8)
        handles.put(share(buffer))
        total = answers.get(timeout=120)
        child.join(timeout=60)
        expected = int(buffer.sum(dtype=torch.int64))
        del buffer
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
        assert total == expected, (total, expected)
        return {"bytes": 64 << 20}


def _ipc_receiver(handles, answers) -> None:
    from atesd_ray.runtime.transfer import open_shared

    buffer = open_shared(handles.get(timeout=120))
    answers.put(int(buffer.sum(dtype=torch.int64)))
    torch.cuda.synchronize()
