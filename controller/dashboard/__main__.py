"""Serve the live page of a run directory, finished or still training (e.g. on shared storage):
``python -m controller.dashboard RUN_DIR [--host HOST] [--port PORT]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atesd_ray.config import DashboardConfig
from controller.dashboard.server import DashboardServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.dashboard", description="Serve the live page of a run directory."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--host", default=DashboardConfig.host)
    parser.add_argument("--port", type=int, default=DashboardConfig.port, help="0: any free port")
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"{args.run_dir} is not a run directory (it has no config.yaml)", file=sys.stderr)
        return 2
    server = DashboardServer(args.run_dir, args.host, args.port)
    print(f"dashboard: {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
