"""``make gpu-check``: what only a GPU can show, in one command of a few minutes (README, "GPU status").

The torch part needs only PyTorch (CUDA), transformers and peft (``--torch-only`` runs just it, on
a machine without Ray or vLLM); it imports no Ray:

1. a bfloat16 student step of a Qwen3-shaped model with LoRA r 64: forward, the distillation loss
   (chunked over the LM head), backward, AdamW; finite, timed, peak memory;
2. the loss kernels on the GPU against float64 on the CPU, and the rollout gap's sampler cut;
3. a one-GPU NCCL group built as the collective transport builds it (timeout), a broadcast, abort;
4. the CUDA IPC path between two processes: a buffer shared by handle and opened on the receiver's
   own device reads back exactly; the sender then frees it (``ipc_collect``).

The run part needs the installed project (Ray, vLLM's CUDA build), on one GPU or more:

5. three OPSD steps of the bundled model, vLLM rollout and HF teacher beside the student, all on
   GPUs: the train-inference gap and every sync check under the float32 bound, every role's
   device a GPU (``topology.json``), timings; then two bfloat16 steps, whose gap sets that bound;
6. a collective sync one tensor per bucket (every fused q/k/v and gate/up split) into the GPU
   vLLM: its log-probs equal the student's to 1e-4 (NCCL between two GPUs; gloo staging on one);
7. CUDA IPC: rollout colocated with the student rank on one GPU, two steps, sync checks exact;
8. an EMA teacher on the GPU taking syncs of CPU tensors (and of an NCCL broadcast with 3 GPUs).

Prints one line per check and writes ``gpu_check.json``; exits 1 when a check fails, 2 when there
is no GPU (one line).
"""
