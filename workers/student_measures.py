"""A student rank's measurements, taken on its current weights without an update (a mixin of
:class:`workers.student.StudentRank`): the probe set's NLL and KL (what the exposure controller
learns from), the fixed-exposure sweep's per-token mismatch, and log-probs of fixed responses (what
checks a weight sync). Every rank joins each one: the model is sharded."""

from __future__ import annotations

import torch
import torch.distributed as dist

from atesd_ray.losses import mismatch_per_token, nll_loss
from atesd_ray.objective import ROLLOUT_KEYS, TEACHER_KEYS, Response, fetch, take, teacher_targets

Rows = dict[str, torch.Tensor]


class Measurements:
    """Uses the rank's policy, tokenizer, config and its micro-batch loop (``_accumulate``)."""

    def set_probe(self, records: list[dict]) -> int:
        """The fixed probe set: student prompt + reference solution, for the probe NLL."""
        prompts = self.student_prompts([r["problem"] for r in records])
        refs = [self.tokenizer(r["reference"], add_special_tokens=False)["input_ids"] for r in records]
        self.probe = self._padded(prompts, refs)
        return len(records)

    @torch.no_grad()
    def mismatch(self, rollout_refs: list, teacher_refs: list) -> list[dict]:
        """Per-token KL(p_T||p_S), top-1 disagreement and student confidence of every rollout row
        under the current student, no update: the fixed-exposure sweep's measurement. The numbers
        come from the same code as the training step's statistics (``losses._mismatch_terms``)."""
        rollout, _ = fetch(rollout_refs)
        teacher, _ = fetch(teacher_refs)
        rows = take(rollout, ROLLOUT_KEYS) | take(teacher, TEACHER_KEYS)
        loss_cfg = self.cfg.algorithm.loss
        self.policy.eval()

        def per_token(out: Response, part: Rows) -> torch.Tensor:
            targets = teacher_targets(part, out.valid)
            return mismatch_per_token(
                out.hidden, targets, loss_cfg.temperature, project=out.head, chunk_size=loss_cfg.chunk_size
            )

        mine = []
        for idx in self._micro_batches(len(rollout)):
            part = self._slice(rows, idx)
            values = self.policy(part, per_token).cpu().split(part["response_mask"].sum(-1).tolist())
            mine += [(i, v.T.tolist()) for i, v in zip(idx, values, strict=False)]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        nt, grounding = rollout.non_tensor_batch, teacher.batch["grounding"]
        return [
            {"kl": kl, "disagree": disagree, "confidence": confidence, "uid": str(nt["uid"][i])}
            | {"difficulty": nt["difficulty"][i], "grounding": float(grounding[i])}
            for i, (kl, disagree, confidence) in sorted(r for part in gathered for r in part)
        ]

    def set_probe_rollouts(self, rollouts: list, scored: list) -> int:
        """Fixed rollouts of the probe problems and the full-exposure (α = 1) teacher's targets on
        them, for ``probe_kl``."""
        rollout, _ = fetch(rollouts)
        teacher, _ = fetch(scored)
        self.probe_rollouts = take(rollout, ROLLOUT_KEYS) | take(teacher, TEACHER_KEYS)
        return len(rollout)

    @torch.no_grad()
    def probe(self, names: list[str]) -> dict[str, float]:
        """The probe measurements ``names`` on the current weights, every rank joining:

        - ``probe_nll``: the mean per-token NLL of the probe problems' reference solutions;
        - ``probe_kl``: the token mean of KL(p_T || p_S) on fixed rollouts of the probe problems, the
          teacher at full exposure (α = 1), as OPSD trains it; how far the student still is from
          the privileged teacher, whatever exposure the controller chooses.
        """
        measures = {"probe_nll": self._probe_nll, "probe_kl": self._probe_kl}
        return {name: measures[name]() for name in names}

    def _probe_kl(self) -> float:
        rows = getattr(self, "probe_rollouts", None)
        if rows is None:
            return float("nan")
        self.policy.eval()
        loss_cfg = self.cfg.algorithm.loss

        def kl(out: Response, part: Rows) -> tuple:
            per_token = mismatch_per_token(
                out.hidden,
                teacher_targets(part, out.valid),
                loss_cfg.temperature,
                project=out.head,
                chunk_size=loss_cfg.chunk_size,
            )
            total = per_token[:, 0].double().sum()
            return total, torch.stack([total, total.new_tensor(float(per_token.shape[0]))])

        total = self._accumulate(rows, 2, kl, train=False)
        return float(total[0] / total[1].clamp(min=1))

    def _probe_nll(self) -> float:
        if self.probe is None:
            return float("nan")
        self.policy.eval()

        def nll(out: Response, _rows: Rows) -> tuple:
            loss = nll_loss(out.hidden, out.tokens, project=out.head)
            return loss, torch.stack(
                [loss.double(), loss.new_tensor(out.tokens.numel(), dtype=torch.float64)]
            )

        total = self._accumulate(self.probe, 2, nll, train=False)
        return float(total[0] / total[1].clamp(min=1))

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs (temperature 1) of fixed responses under the current student (every
        rank returns all), without dropout."""
        self.policy.eval()

        def logprobs(out: Response, _rows: Rows) -> torch.Tensor:
            return torch.log_softmax(out.head(out.hidden).float(), dim=-1).gather(-1, out.tokens[:, None])[
                :, 0
            ]

        flat = self.policy(
            self._slice(self._padded(prompts, responses), list(range(len(prompts)))), logprobs
        ).cpu()
        out, offset = [], 0
        for r in responses:
            out.append(flat[offset : offset + len(r)].tolist())
            offset += len(r)
        return out
