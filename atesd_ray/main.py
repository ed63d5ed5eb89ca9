"""Entry point: ``atesd-ray`` == ``python -m atesd_ray.main``, a Hydra app; ``mode=`` picks the job."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from atesd_ray.config import Config, ConfigError, check_override_keys, register_schemas, to_config

register_schemas()


def run_mode(cfg: Config, run_dir: Path) -> dict:
    if cfg.mode == "train":
        from atesd_ray.train import run

        return run(cfg, run_dir)
    if cfg.mode == "motab_synthesize":
        from atesd_ray.motab_synthesize import run

        return run(cfg, run_dir)
    if cfg.mode == "eval":
        from atesd_ray.evaluate import run

        return run(cfg, run_dir)
    if cfg.mode == "sweep_exposure":
        from atesd_ray.sweep_exposure import run

        return run(cfg, run_dir)
    if cfg.mode == "report":
        from atesd_ray.report import run

        return run(cfg, run_dir)
    raise ConfigError(f"config error at 'mode': mode={cfg.mode} is not available in this build")


@hydra.main(version_base=None, config_path="pkg://conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    config = to_config(cfg)
    run_dir = Path(config.run_dir or HydraConfig.get().runtime.output_dir)
    run_mode(config, run_dir)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    hydra_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
