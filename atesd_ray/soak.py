"""``make soak``: a long tiny-model run with actors killed from outside while it trains, checked
against an unkilled run with the same seed.

``python -m atesd_ray.soak [--steps 200] [--kill-every 20] [--out runs/soak] [OVERRIDE ...]`` trains
the reference run, then the same run (both with the Hydra overrides given, e.g. ``rollout.engine=vllm``) while a :class:`FaultInjector` kills one actor every ``--kill-every`` steps,
cycling over rollout and teacher replicas (restarted, the step retried), student ranks and the
controller (rolled back to the last checkpoint), by ``ray.kill`` and by SIGKILL of the process.
It passes when every step is logged once and every step's metrics equal the reference's.

The injector finds actors by name in Ray's actor table (``ray._private.state``: it needs no
dashboard) and, for SIGKILL, their pid there; it works on a local cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

# the per-step metrics compared with the reference run (timings differ by nature)
COMPARED = (
    "loss",
    "mismatch_kl",
    "top1_disagree",
    "confidence",
    "grad_norm",
    "probe_nll",
    "accuracy",
    "response_len",
    "tokens",
    "alpha",
)
# float tolerance: a retried or rolled-back step recomputes the same sums in the same order, so
# the figures agree to rounding noise
REL, ABS = 1e-5, 1e-7


def run_actors(run_dir: Path) -> dict[str, dict]:
    """The live actors of the training run in ``run_dir``, by name (``atesd-<run dir>-<time>-...``)."""
    from ray._private import state

    prefix = f"atesd-{Path(run_dir).resolve().name}-"
    return {
        a["Name"]: a
        for a in state.actors().values()
        if a["Name"].startswith(prefix) and a["State"] == "ALIVE"
    }


def role_of(name: str) -> str | None:
    m = re.search(r"-(rollout|teacher|student)-\d+$", name)
    return m.group(1) if m else ("controller" if name.endswith("-controller") else None)


def kill(run_dir: Path, role: str, how: str) -> str:
    """Kill one live ``role`` actor of the run in ``run_dir``: ``ray.kill`` (a crash: Ray restarts the
    actor if its restart budget allows) or ``sigkill`` of its process. Returns its name."""
    named = sorted(n for n in run_actors(run_dir) if role_of(n) == role)
    if not named:
        raise LookupError(f"no live {role} actor of the run in {run_dir}")
    name = named[0]
    if how == "ray.kill":
        ray.kill(ray.get_actor(name), no_restart=False)
    elif how == "sigkill":
        os.kill(run_actors(run_dir)[name]["Pid"], signal.SIGKILL)
    else:
        raise ValueError(f"kill: how must be ray.kill or sigkill, got {how!r}")
    return name


def steps_logged(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@dataclass
class FaultInjector:
    """Kills actors of the run in ``run_dir`` while it trains: ``plan`` holds (steps logged, role,
    how); each kill happens once ``metrics.jsonl`` has that many steps, i.e. while the last one's
    checkpoint is written or the next step runs (kills due at the same count, in plan order, back
    to back)."""

    run_dir: Path
    plan: list[tuple[int, str, str]]
    killed: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fault-injector", daemon=True)

    def __enter__(self) -> FaultInjector:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        pending = sorted(self.plan, key=lambda p: p[0])  # kills due together go back to back
        while pending and not self._stop.wait(0.2):
            logged = steps_logged(self.run_dir)
            while pending and logged >= pending[0][0]:
                after, role, how = pending[0]
                try:
                    name = kill(self.run_dir, role, how)
                except LookupError:  # between a rollback's teardown and the new actors: next poll
                    break
                except Exception as err:  # noqa: BLE001 - reported to the caller, who asserts on it
                    self.errors.append(f"{role} {how}: {err!r}")
                else:
                    self.killed.append({"after_step": after, "role": role, "how": how, "name": name})
                pending.pop(0)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def differences(reference: list[dict], faulty: list[dict]) -> list[str]:
    """What differs between two runs' ``metrics.jsonl``: steps missing or repeated, and any
    compared metric outside the tolerance."""
    out = []
    steps = [m["step"] for m in faulty]
    if steps != [m["step"] for m in reference]:
        out.append(f"steps {steps} != reference {[m['step'] for m in reference]}")
    for a, b in zip(reference, faulty, strict=False):
        for key in COMPARED:
            if key in a and not math.isclose(a[key], b.get(key, math.nan), rel_tol=REL, abs_tol=ABS):
                out.append(f"step {a['step']} {key}: {b.get(key)} != reference {a[key]}")
    return out


# role, how: every kind of fault, in turn
CYCLE = (
    ("rollout", "ray.kill"),
    ("teacher", "sigkill"),
    ("student", "ray.kill"),
    ("rollout", "sigkill"),
    ("controller", "ray.kill"),
    ("teacher", "ray.kill"),
)


def soak_plan(steps: int, every: int) -> list[tuple[int, str, str]]:
    return [(after, *CYCLE[i % len(CYCLE)]) for i, after in enumerate(range(every, steps, every))]


def overrides(steps: int, run_dir: Path) -> list[str]:
    return [
        "model=tiny",
        "algorithm=atesd",
        "controller.hold=2",
        "controller.lookahead=2",
        "controller.batch_decisions=2",
        f"trainer.total_steps={steps}",
        "trainer.save_every=5",
        "trainer.keep_last=2",
        "trainer.prompts_per_step=4",
        "trainer.micro_batch=2",
        "trainer.lr=1e-3",
        "rollout.max_new_tokens=16",
        "rollout.micro_batch=8",
        "teacher.micro_batch=4",
        "data.synthetic.n_train=64",
        "data.synthetic.n_eval=8",
        "data.probe_size=2",
        "eval.at_start=false",
        "eval.at_end=false",
        "tracking.backends=[jsonl]",
        "dashboard.enabled=false",
        "trainer.fault_retries=5",
        f"run_dir={run_dir}",
        "resume=never",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kill-every", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args, extra = parser.parse_known_args()  # extra: Hydra overrides of both runs

    from atesd_ray.config import compose
    from atesd_ray.modes.train import run

    def config(run_dir: Path):
        return compose(*overrides(args.steps, run_dir), *extra)

    reference_dir, faulty_dir = args.out / "reference", args.out / "faulty"
    t0 = time.monotonic()
    run(config(reference_dir), reference_dir)
    t1 = time.monotonic()
    with FaultInjector(faulty_dir, soak_plan(args.steps, args.kill_every)) as injector:
        summary = run(config(faulty_dir), faulty_dir)
    t2 = time.monotonic()
    diff = differences(metrics(reference_dir), metrics(faulty_dir))
    report = {
        "steps": args.steps,
        "kill_every": args.kill_every,
        "killed": injector.killed,
        "injector_errors": injector.errors,
        "rollbacks": summary.get("rollbacks", 0),
        "differences": diff,
        "reference_s": round(t1 - t0, 1),
        "faulty_s": round(t2 - t1, 1),
        "final": {k: summary["final_metrics"].get(k) for k in COMPARED},
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = (
        not diff
        and not injector.errors
        and len(injector.killed) == len(soak_plan(args.steps, args.kill_every))
    )
    print("soak: PASS" if ok else "soak: FAIL", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
