"""``atesd_ray``, ``workers``, ``controller`` and ``conf`` resolve the same way from a plain
checkout on the path and from a built wheel: imports, Hydra's ``pkg://conf``, the entry point.
(The third way, a ``ray job submit --working-dir .`` upload, is checked in test_cluster.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atesd_ray", "workers", "controller", "conf")
MODULES = (
    *PACKAGES,
    "atesd_ray.main",
    "workers.vllm_engine",
    "controller.actor",
)  # vllm_engine: no vLLM needed

RESOLVE = f"""
import importlib, json
files = {{m: importlib.import_module(m).__file__ for m in {MODULES!r}}}
from hydra import compose, initialize_config_module
from atesd_ray.config import register_schemas, to_config
register_schemas()
with initialize_config_module("conf", version_base=None):
    cfg = to_config(compose("config", overrides=["experiment=paper_atesd", "model=qwen3_4b"]))
print(json.dumps({{"files": files, "algorithm": cfg.algorithm.name, "clip": cfg.algorithm.loss.clip}}))
"""


def _run(args: list[str], pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel_target(tmp_path_factory) -> Path:
    """The package built as a wheel (from a copy of the tree) and installed into a bare directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "outputs", "build", "*.egg-info", "__pycache__"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")],
        cwd=src,
        check=True,
    )
    (wheel,) = (tmp / "dist").glob("atesd_ray-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "target"), str(wheel)], check=True)
    return tmp / "target"


@pytest.mark.parametrize("layout", ["checkout", "wheel"])
def test_packages_and_hydra_config_resolve(layout: str, wheel_target: Path, tmp_path: Path) -> None:
    root = ROOT if layout == "checkout" else wheel_target
    out = _run([sys.executable, "-c", RESOLVE], root, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for module, file in result["files"].items():
        assert Path(file).resolve().is_relative_to(root.resolve()), f"{module} came from {file}, not {root}"
    assert result["algorithm"] == "atesd" and result["clip"] == 1e-6


@pytest.mark.parametrize("layout", ["checkout", "wheel"])
def test_entry_point_finds_pkg_conf(layout: str, wheel_target: Path, tmp_path: Path) -> None:
    root = ROOT if layout == "checkout" else wheel_target
    cmd = [sys.executable, "-m", "atesd_ray.main"]
    if layout == "wheel":  # the console script the wheel installs
        cmd = [str(wheel_target / "bin" / "atesd-ray")]
    out = _run([*cmd, "experiment=paper_opsd", "model=qwen3_8b", "--cfg", "job"], root, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "name: qwen3_8b" in out.stdout and "clip: 1.0e-07" in out.stdout and "total_steps: 50" in out.stdout
    )
