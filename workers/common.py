"""What every worker actor shares: process setup."""

from __future__ import annotations

import os

import torch

from atesd_ray.config import Config, RoleResources
from atesd_ray.console import configure_actor
from atesd_ray.models import set_torch_threads
from atesd_ray.runtime.devices import actor_device, threads


def setup_actor(cfg: Config, res: RoleResources, name: str) -> tuple[int, torch.device]:
    """Logging and threads for an actor process (``runtime/devices.py``: as many as it reserved);
    returns its torch thread count and the device of its models."""
    configure_actor(name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return set_torch_threads(threads(cfg, res)), actor_device(res, name)
