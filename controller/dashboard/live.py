"""What the driver runs beside training: the live page, the trainer's Prometheus series, and at
the end of the run the timeline PNG. A watcher of ``atesd_ray.modes.train.run``; the entry point
(``atesd_ray/main.py``) starts one for every training job."""

from __future__ import annotations

from pathlib import Path

from atesd_ray.config import Config
from controller.dashboard.render import render_timeline
from controller.dashboard.server import DashboardServer
from controller.metrics import TrainerMetrics


class RunMonitor:
    def __init__(self, cfg: Config, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics = TrainerMetrics(run=self.run_dir.resolve().name, model=cfg.model.name)
        self.server = None
        if cfg.dashboard.enabled:
            self.server = DashboardServer(self.run_dir, cfg.dashboard.host, cfg.dashboard.port).start()
            print(
                f"dashboard: {self.server.url}  (live page of this run, read-only; JSON at api/metrics, api/timeline)",
                flush=True,
            )
            if "jsonl" not in cfg.tracking.backends:
                print(
                    "dashboard: tracking.backends has no jsonl, so the page shows no per-step metrics",
                    flush=True,
                )

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    def record(self, step: int, metrics: dict) -> None:
        self.metrics.record(step, metrics)

    def finish(self) -> dict:
        """At the end of the run: the timeline PNG; the page's address for the run's summary."""
        path = render_timeline(self.run_dir)
        if path is not None:
            print(f"controller timeline: {path}", flush=True)
        return {"dashboard": self.url}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> RunMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
