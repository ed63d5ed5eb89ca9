"""MOTAB and SKD, the pure logic (DESIGN §5): values, the adaptive boundary, root cause, stitching.

A trajectory is built one reasoning step at a time (a step ends at ``motab.step_delimiter``).
For each student step a from state s the teacher gives

- its value V_T = exp(mean over the step's tokens of log p_T(token | s, previous tokens)), the
  geometric-mean teacher probability of the step (:func:`step_value`);
- its entropy H at s: the entropy of its top-k next-token probabilities, renormalized over those
  k (:func:`topk_entropy`);

and the step is accepted while V_T >= ε(s) = ε0 · exp(-θ H) (:func:`safety_boundary`): an
uncertain teacher loosens the gate. On a breach, the root cause t* (:func:`root_cause`) is the step
with the steepest drop in value among those whose previous step was safe; the trajectory rewinds
to the state before t* and the teacher writes the rest. The training target keeps every student
step, the flawed ones included, then the revise phrase, then the teacher's suffix
(:func:`stitch`). One intervention per trajectory (:meth:`Trajectory.intervene`).

SKD instead checks each step on its own: the student's step stays when the teacher's mean
probability of it exceeds γ times the student's own (:func:`skd_accept`), else the teacher
rewrites that step. "Mean probability" is the geometric mean, as in MOTAB's released SKD baseline,
both at temperature 1.

Indices of steps (breach step, t*) are 0-based.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

STUDENT = "student"
TEACHER = "teacher"
# why a generated piece ended: at the step delimiter, at an end-of-sequence token, at its token cap
STEP_ENDS = ("step", "eos", "length")


class TrajectoryError(RuntimeError):
    """A trajectory was asked to do what its rules forbid (a second intervention, a step after its end)."""


def step_value(token_logprobs: Sequence[float] | torch.Tensor) -> float:
    """V = exp(mean log-prob): the geometric-mean probability of a step's tokens."""
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64)
    if lp.numel() == 0:
        raise ValueError("a step needs at least one token")
    return float(lp.mean().exp())


def topk_entropy(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy (nats) of the top-``k`` probabilities of ``logprobs`` [..., V], renormalized over those k."""
    top = logprobs.float().topk(min(k, logprobs.shape[-1]), dim=-1).values.log_softmax(-1)
    return -(top.exp() * top).sum(-1)


def step_end(finish_reason: str, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """How a generated piece ended (one of ``STEP_ENDS``), from the engine's finish reason, which says
    "stop" both for an end-of-sequence token and for a stop string."""
    if ids and ids[-1] in eos_ids:
        return "eos"
    return "step" if finish_reason == "stop" else "length"


def safety_boundary(entropy: float, eps0: float, theta: float) -> float:
    """ε(s) = ε0 · exp(-θ · H(s))."""
    return eps0 * math.exp(-theta * entropy)


def root_cause(values: Sequence[float], boundaries: Sequence[float]) -> int:
    """t* = argmin over steps k whose previous step was safe (V_{k-1} >= ε_{k-1}) of V_k - V_{k-1};
    when no step qualifies (a single step, or no safe step before any other), argmin V_k.
    Ties go to the earliest step."""
    if not values or len(values) != len(boundaries):
        raise ValueError(
            f"root_cause needs one boundary per value, got {len(values)} values, {len(boundaries)} boundaries"
        )
    drops = [
        (values[k] - values[k - 1], k) for k in range(1, len(values)) if values[k - 1] >= boundaries[k - 1]
    ]
    if drops:
        return min(drops)[1]
    return min(range(len(values)), key=lambda k: (values[k], k))


def skd_accept(teacher_value: float, student_value: float, gamma: float) -> bool:
    """SKD keeps the student's step when the teacher's mean probability of it exceeds γ × the student's."""
    return teacher_value > gamma * student_value


def revise_joint(student_text: str, revise_phrase: str) -> str:
    """The revise phrase as appended after ``student_text``: its leading newlines are dropped when the
    student's text already ends with a blank line (a step ends with the delimiter ``.\\n\\n``), so
    exactly one blank line separates the last student step from "However,"."""
    return revise_phrase.lstrip("\n") if student_text.endswith("\n\n") else revise_phrase


def stitch(student_steps: Sequence[str], revise_phrase: str, suffix: str) -> str:
    """MOTAB's target: every student step (flawed ones included), the revise phrase, the teacher's suffix."""
    student = "".join(student_steps)
    return student + revise_joint(student, revise_phrase) + suffix


@dataclass
class Step:
    """One step of a trajectory, in the student's tokens.

    ``value``, ``entropy``, ``boundary`` and ``student_value`` describe the student's candidate
    for this step; for a step the teacher rewrote (SKD) they are those of the rejected candidate,
    whose text is ``rejected``.
    """

    ids: list[int]  # without an end-of-sequence token (see Trajectory.segments)
    text: str
    value: float  # V_T
    entropy: float  # H at the step's start
    boundary: float  # ε(s)
    student_value: float  # the student's own geometric-mean probability of its candidate
    author: str = STUDENT
    rejected: str | None = None

    @property
    def safe(self) -> bool:
        return self.value >= self.boundary

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": len(self.ids),
            "author": self.author,
            "value": self.value,
            "entropy": self.entropy,
            "boundary": self.boundary,
            "student_value": self.student_value,
            **({"rejected": self.rejected} if self.rejected is not None else {}),
        }


@dataclass
class Trajectory:
    """One monitored trajectory of one problem; lives while ``end`` is None."""

    record: dict
    sample: int
    steps: list[Step] = field(default_factory=list)
    end: str | None = None  # "eos" | "max_steps" | "max_tokens" | "takeover"
    # the teacher's suffix after an intervention, in the student's tokens, without an end-of-sequence token
    breach: int | None = None  # the step whose value fell below its boundary
    t_star: int | None = None  # the root-cause step the teacher rewound to
    suffix_ids: list[int] | None = None
    suffix_text: str = ""
    suffix_end: str | None = None

    @property
    def live(self) -> bool:
        return self.end is None

    @property
    def response_ids(self) -> list[int]:
        return [t for s in self.steps for t in s.ids]

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.steps)

    def add_step(self, step: Step, ended: str, max_steps: int, max_tokens: int) -> None:
        """Append the next step; ``ended`` is how its generation stopped (one of ``STEP_ENDS``)."""
        if not self.live:
            raise TrajectoryError(
                f"trajectory {self.record['id']}#{self.sample} has ended ({self.end}); no more steps"
            )
        if ended not in STEP_ENDS:
            raise ValueError(f"unknown step end {ended!r}; expected one of {STEP_ENDS}")
        self.steps.append(step)
        if ended == "eos":
            self.end = "eos"
        elif len(self.steps) >= max_steps:
            self.end = "max_steps"
        elif self.tokens >= max_tokens:
            self.end = "max_tokens"

    def close(self, reason: str) -> None:
        """End without another step (the writer stopped at once: ``reason`` "eos")."""
        if not self.live:
            raise TrajectoryError(f"trajectory {self.record['id']}#{self.sample} has ended ({self.end})")
        self.end = reason

    def intervene(self, t_star: int) -> None:
        """The last step breached: rewind to the state before ``t_star``; the teacher writes on from there.
        At most one intervention per trajectory."""
        if self.breach is not None:
            raise TrajectoryError(
                f"trajectory {self.record['id']}#{self.sample} already had its intervention (breach at step {self.breach})"
            )
        if not 0 <= t_star < len(self.steps):
            raise ValueError(f"t* = {t_star} is not a step of a {len(self.steps)}-step trajectory")
        self.breach, self.t_star, self.end = len(self.steps) - 1, t_star, "takeover"

    @property
    def resume_steps(self) -> list[Step]:
        """The steps the next writer continues: after an intervention those before t* (the rewind),
        otherwise all of them."""
        return self.steps if self.t_star is None else self.steps[: self.t_star]

    def take_over(self, ids: list[int], text: str, ended: str) -> None:
        """Attach the teacher's suffix, written from the state before t*."""
        if self.t_star is None or self.suffix_ids is not None:
            raise TrajectoryError("a suffix needs exactly one intervention before it and none after")
        self.suffix_ids, self.suffix_text, self.suffix_end = list(ids), text, ended

    def text(self, revise_phrase: str) -> str:
        """The training target: the steps, and after an intervention the revise phrase and the suffix."""
        steps = [s.text for s in self.steps]
        return (
            stitch(steps, revise_phrase, self.suffix_text) if self.suffix_ids is not None else "".join(steps)
        )

    def revise(self, revise_phrase: str) -> str:
        """The revise phrase as it follows this trajectory's steps in :meth:`text`."""
        return revise_joint("".join(s.text for s in self.steps), revise_phrase)

    @property
    def ends_with_eos(self) -> bool:
        """Whether the target is a finished solution (its writer stopped), not one cut at a limit."""
        return self.suffix_end == "eos" if self.suffix_ids is not None else self.end == "eos"

    def segments(self, revise_ids: list[int], eos_id: int) -> list[tuple[list[int], str]]:
        """The target's tokens in pieces with their on-policy loss: "distill" for the student's accepted
        steps, "nll" for teacher-written tokens (SKD's rewritten steps; MOTAB's revise phrase and
        suffix), "context" (no loss) for the step that breached; a finished target ends with
        ``eos_id``, trained like the piece it ends. ``revise_ids``: the tokens of :meth:`revise`."""
        pieces = []
        for i, s in enumerate(self.steps):
            role = "context" if i == self.breach else ("distill" if s.author == STUDENT else "nll")
            pieces.append((list(s.ids), role))
        if self.suffix_ids is not None:
            pieces += [(list(revise_ids), "nll"), (list(self.suffix_ids), "nll")]
        if self.ends_with_eos and pieces:
            pieces[-1][0].append(eos_id)
        return pieces

    def metadata(self) -> dict:
        student = sum(len(s.ids) for s in self.steps if s.author == STUDENT)
        suffix = len(self.suffix_ids or [])
        return {
            "steps": [s.as_dict() for s in self.steps],
            "breach_step": self.breach,
            "t_star": self.t_star,
            "end": self.end,
            "suffix_end": self.suffix_end,
            "student_tokens": student,
            "teacher_tokens": self.tokens - student + suffix,
            "suffix_tokens": suffix,
        }


def observe_motab_step(traj: Trajectory, step: Step, ended: str, max_steps: int, max_tokens: int) -> bool:
    """Add a student step under MOTAB's gate; True when it breached and the teacher must take over."""
    traj.add_step(step, ended, max_steps, max_tokens)
    if step.safe:
        return False
    traj.intervene(root_cause([s.value for s in traj.steps], [s.boundary for s in traj.steps]))
    return True


def summarize(trajectories: Sequence[Trajectory], correct: Sequence[bool] | None = None) -> dict[str, float]:
    """Breach rate, mean t* and breach step (over breached trajectories; 0-based step indices), mean
    lengths in tokens (the suffix over breached trajectories), and the targets' accuracy if graded."""

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    meta = [t.metadata() for t in trajectories]
    breached = [m for m in meta if m["breach_step"] is not None]
    steps = [s for t in trajectories for s in t.steps]
    out = {
        "trajectories": len(trajectories),
        "breach_rate": len(breached) / max(len(meta), 1),
        "mean_t_star": mean([m["t_star"] for m in breached]),
        "mean_breach_step": mean([m["breach_step"] for m in breached]),
        "mean_steps": mean([len(t.steps) for t in trajectories]),
        "teacher_step_rate": mean([float(s.author == TEACHER) for s in steps]),
        "student_tokens": mean([m["student_tokens"] for m in meta]),
        "teacher_tokens": mean([m["teacher_tokens"] for m in meta]),
        "suffix_tokens": mean([m["suffix_tokens"] for m in breached]),
        "target_tokens": mean([m["student_tokens"] + m["teacher_tokens"] for m in meta]),
        "mean_value": mean([s.value for s in steps]),
        "mean_boundary": mean([s.boundary for s in steps]),
    }
    if correct is not None:
        out["target_accuracy"] = mean([float(c) for c in correct])
    return out
