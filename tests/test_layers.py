"""The code's shape, read from its source: layers point one way, and no module grows past 400 lines
(README, "Layout").

Every module has a rank (:data:`LAYERS`, lowest first), and every import it makes, function-level
and type-only ones included, goes to a module of an equal or lower rank. ``workers/`` and
``controller/`` share a rank and never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atesd_ray", "workers", "controller")
MAX_LINES = 400

# lowest first; a pattern ending in ".*" takes a package's modules, the package itself listed apart
LAYERS: list[tuple[str, list[str]]] = [
    (
        "leaves",
        [
            "atesd_ray",
            "atesd_ray.schema",
            "atesd_ray.console",
            "atesd_ray.sampling",
            "atesd_ray.sequences",
            "atesd_ray.grading",
            "atesd_ray.tables",
            "atesd_ray.trajectories",
            "atesd_ray.data.records",
            "atesd_ray.data.stories",
            "atesd_ray.data.sampler",
            "atesd_ray.runtime",
            "atesd_ray.runtime.transfer",
            "atesd_ray.runtime.weights",
            "atesd_ray.runtime.weight_delta",
            "atesd_ray.runtime.weight_formats",
            "atesd_ray.runtime.checkpoint",
            "atesd_ray.runtime.once",
            "atesd_ray.interrupts",
            "atesd_ray.run_lock",
            "atesd_ray.modes",
            "atesd_ray.gpu_check",
            "workers",
            "workers.few_row_linear",
            "controller",
            "controller.dashboard",
            "controller.dashboard.data",
            "controller.policy",
            "controller.features",
            "controller.metrics",
        ],
    ),
    ("config", ["atesd_ray.config", "atesd_ray.config.*"]),
    (
        "library",
        [
            "atesd_ray.data",
            "atesd_ray.data.synthetic",
            "atesd_ray.data.loaders",
            "atesd_ray.prompts",
            "atesd_ray.chunked",
            "atesd_ray.losses",
            "atesd_ray.teacher_signal",
            "atesd_ray.rollout_gap",
            "atesd_ray.objective",
            "atesd_ray.models",
            "atesd_ray.model_folders",
            "atesd_ray.rollout_batch",
            "atesd_ray.tracking",
            "atesd_ray.run_summary",
            "atesd_ray.job",
        ],
    ),
    (
        "runtime",
        [
            "atesd_ray.runtime.devices",
            "atesd_ray.runtime.cluster",
            "atesd_ray.runtime.weight_sync",
            "atesd_ray.runtime.weight_sync.*",
            "atesd_ray.evaluation",
            "atesd_ray.monitored",
        ],
    ),
    ("actors", ["workers.*", "controller.*"]),
    ("composition root", ["atesd_ray.assembly", "atesd_ray.faults"]),
    ("algorithms", ["atesd_ray.algorithms", "atesd_ray.algorithms.*"]),
    ("modes", ["atesd_ray.modes.*"]),
    (
        "entry points",
        [
            "atesd_ray.main",
            "atesd_ray.compare",
            "atesd_ray.soak",
            "atesd_ray.gpu_check.*",
            "controller.dashboard.__main__",
        ],
    ),
]
SIDE_BY_SIDE = ("workers", "controller")  # one rank, no imports between them


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def rank(module: str) -> int:
    """The layer of ``module``: the most specific pattern that names it wins (an exact name over a
    package's ``.*``), so ``controller.dashboard.__main__`` is an entry point inside ``controller.*``."""
    matches = [
        (pattern == module, i)
        for i, (_, patterns) in enumerate(LAYERS)
        for pattern in patterns
        if pattern == module or (pattern.endswith(".*") and fnmatch(module, pattern))
    ]
    assert matches, f"{module} has no layer: add it to LAYERS in tests/test_layers.py"
    exact = [i for is_exact, i in matches if is_exact]
    assert len(exact) <= 1 and (exact or len(matches) == 1), f"{module} is in several layers: {matches}"
    return exact[0] if exact else matches[0][1]


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, function-level and type-only imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_import_points_down_the_layers():
    edges = graph()
    upward = [
        f"{m} ({LAYERS[rank(m)][0]}) imports {t} ({LAYERS[rank(t)][0]})"
        for m, targets in edges.items()
        for t in sorted(targets)
        if rank(t) > rank(m)
    ]
    assert upward == []


def test_workers_and_the_controller_import_each_other_not():
    edges = graph()
    crossing = [
        (m, t)
        for m, targets in edges.items()
        for t in targets
        if m.split(".")[0] in SIDE_BY_SIDE
        and t.split(".")[0] in SIDE_BY_SIDE
        and m.split(".")[0] != t.split(".")[0]
    ]
    assert crossing == []


def test_the_import_graph_has_no_cycle():
    """Equal ranks may import each other; the graph still has no circle."""
    edges, state = graph(), {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = "done"
        return None

    cycles = [c for m in sorted(edges) if m not in state and (c := visit(m, []))]
    assert cycles == []


def test_no_source_file_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_config_loads_none_of_the_libraries_the_console_quiets():
    """The entry point imports the config before it sets the console (``configure_driver``): verl,
    transformers, vLLM and Ray, whose import-time notices obey those settings, and every algorithm
    module must not load with it."""
    code = (
        "import sys, atesd_ray.config; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'verl', 'transformers', 'vllm', 'ray', 'torch'}), "
        "sorted(m for m in sys.modules if m.startswith('atesd_ray.algorithms')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[] []", out.stdout + out.stderr[-2000:]


def layer_drawing() -> str:
    """The layers, top down, with their modules and how many imports each layer makes into the ones
    below (the README's architecture section shows it; ``python -m tests.test_layers`` prints it)."""
    edges, lines = graph(), []
    by_rank: dict[int, list[str]] = {}
    for m in edges:
        by_rank.setdefault(rank(m), []).append(m)
    for i in reversed(range(len(LAYERS))):
        out = sum(1 for m in by_rank.get(i, []) for t in edges[m] if rank(t) < i)
        lines.append(f"{i} {LAYERS[i][0]:<17} {len(by_rank.get(i, [])):>3} modules, {out:>3} imports down")
    return "\n".join(lines)


if __name__ == "__main__":
    print(layer_drawing())
