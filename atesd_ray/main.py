"""Entry point: ``atesd-ray`` == ``python -m atesd_ray.main``, a Hydra app; ``mode=`` picks the job.

The one place that puts the parts together: the library below it imports neither the dashboard nor
the workers' internals, so the training job's live page is started here."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from atesd_ray import interrupts
from atesd_ray.config import Config, ConfigError, check_override_keys, register_schemas, to_config
from atesd_ray.console import configure_driver
from atesd_ray.data.records import DataError
from atesd_ray.faults import ActorsLost
from atesd_ray.interrupts import stopped
from atesd_ray.job import ResumeRefused, RunDirError
from atesd_ray.rollout_gap import RolloutGapError
from atesd_ray.run_lock import RunDirLocked
from atesd_ray.runtime.checkpoint import CheckpointError
from atesd_ray.runtime.cluster import ClusterError
from atesd_ray.runtime.devices import PlacementError

register_schemas()

# errors whose message names what went wrong, where, and what to do: printed without a traceback
STOPS = (
    ConfigError,
    RunDirError,
    RunDirLocked,
    ResumeRefused,
    ClusterError,
    PlacementError,
    CheckpointError,
    DataError,
    RolloutGapError,
    ActorsLost,
)


def run_mode(cfg: Config, run_dir: Path) -> dict:
    if cfg.mode == "train":
        from atesd_ray.modes.train import run
        from controller.dashboard.live import RunMonitor

        with RunMonitor(cfg, run_dir) as monitor:
            return run(cfg, run_dir, watchers=[monitor])
    if cfg.mode == "motab_synthesize":
        from atesd_ray.modes.motab_synthesize import run

        return run(cfg, run_dir)
    if cfg.mode == "eval":
        from atesd_ray.modes.evaluate import run

        return run(cfg, run_dir)
    if cfg.mode == "sweep_exposure":
        from atesd_ray.modes.sweep_exposure import run

        return run(cfg, run_dir)
    if cfg.mode == "report":
        from atesd_ray.modes.report import run

        return run(cfg, run_dir)
    if cfg.mode == "export":
        from atesd_ray.modes.export import run

        return {"out": str(run(cfg))}
    raise ConfigError(f"config error at 'mode': mode={cfg.mode} is not available in this build")


def place_job(config: Config) -> Path:
    """The job's run directory (absolute: actors on other nodes write checkpoints there too).

    ``run_dir`` unset: Hydra's output directory. In a multirun (``-m``) every job gets its own
    subdirectory (``hydra.sweep.subdir``) of ``run_dir`` and its own tracking run name, so the jobs
    of a sweep never share, or resume, one another's run.
    """
    hc = HydraConfig.get()
    if config.run_dir is None:
        run_dir = Path(hc.runtime.output_dir)
    elif hc.mode == RunMode.MULTIRUN:
        run_dir = Path(config.run_dir) / hc.sweep.subdir
        if config.tracking.experiment:
            config.tracking.experiment = f"{config.tracking.experiment}/{hc.sweep.subdir}"
    else:
        run_dir = Path(config.run_dir)
    run_dir = run_dir.resolve()
    config.run_dir = str(run_dir)
    return run_dir


@hydra.main(version_base=None, config_path="pkg://conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    config = to_config(cfg)
    configure_driver(config.logging.level)
    run_dir = place_job(config)
    try:
        run_mode(config, run_dir)
    except STOPS as err:  # the project's own errors say all there is to say: no traceback
        print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt as err:  # one line, not a traceback; every finally has run
        stop = stopped(err)
        print(
            stop.where
            or f"stopped by {stop.signame} (mode={config.mode}, run_dir {run_dir}); the same command starts "
            "it again (a training run resumes from its last complete checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(stop.code) from None


def main() -> int:
    if "--verbose" in sys.argv:  # everything the libraries log, as they set it
        sys.argv = [a for a in sys.argv if a != "--verbose"] + ["logging.level=debug"]
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    interrupts.install()
    hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
