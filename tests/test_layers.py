"""The code's shape, read from its source: layers point one way, algorithms are found where they
are defined, and no module grows past 400 lines (README, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the actor classes the library builds actors from: the workers' public face
ACTOR_MODULES = {"workers.student", "workers.rollout", "workers.teacher"}
# the static page and the JSON dashboards are not code
MAX_LINES = 400


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _offending(paths: list[Path], forbidden) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(m for m in _imports(path) if forbidden(m))
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_the_library_imports_neither_the_dashboard_nor_worker_internals():
    """Only the entry point (atesd_ray/main.py) puts the live page beside a training job."""
    library = [p for p in _modules("atesd_ray") if p.name != "main.py"]

    def forbidden(m: str) -> bool:
        internal = m.startswith("workers.") and not any(m.startswith(a) for a in ACTOR_MODULES)
        return m.startswith("controller.dashboard") or internal

    assert _offending(library, forbidden) == {}


def test_workers_and_the_controller_import_no_algorithm_driver_code():
    """An algorithm's student-side objective reaches a student rank as an object at construction."""
    paths = _modules("workers") + _modules("controller")
    assert _offending(paths, lambda m: m.startswith("atesd_ray.algorithms")) == {}
    assert _offending(_modules("workers"), lambda m: m.startswith("controller")) == {}


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in (ROOT / "atesd_ray" / "algorithms").glob("[!_]*.py"))
)
def test_every_algorithm_module_imports_on_its_own(module):
    """The config assembles its schema from the algorithm modules, so each must import first, in a
    fresh interpreter, without needing the config."""
    code = f"import atesd_ray.algorithms.{module}; import atesd_ray.config; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_source_file_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for package in ("atesd_ray", "workers", "controller")
        for p in _modules(package)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_config_loads_none_of_the_libraries_the_console_quiets():
    """The entry point imports the config before it sets the console (``configure_driver``): verl,
    transformers and vLLM, whose import-time notices obey those settings, must not load with it."""
    code = (
        "import sys, atesd_ray.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'verl', 'transformers', 'vllm'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
