"""Monitoring without a cluster: the metric registry and the values it exports, the shipped Grafana
dashboard and Prometheus config against that registry, the live page's server (read-only, JSON
endpoints, a metrics file that grows and is rewritten), and the end-of-run PNG."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from controller.dashboard.data import MetricsTail
from controller.dashboard.render import render_timeline
from controller.dashboard.server import STATIC, DashboardServer
from controller.metrics import RUN_TAGS, SERIES, beta_stats, controller_values, trainer_values
from tests.conftest import TINY, make_config

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "controller" / "dashboard"
FEATURES = {"progress": 0.25, "alpha": 0.5, "loss": 0.01, "mismatch_kl": 0.02, "top1_disagree": 0.1,
            "probe_nll": 2.5, "confidence": 0.4}  # fmt: skip


def decision(i: int, hold: int = 2, **fields) -> dict:
    """A timeline entry as the ATESD controller writes it."""
    entry = {"decision": i, "first_step": i * hold, "last_step": i * hold + hold - 1, "alpha": 0.3 + 0.1 * i,
             "a": 1.5 + i, "b": 2.0, "features": dict(FEATURES, progress=i / 4), "g_lp": None, "g_gt": None,
             "reward": None, "advantage": None, "status": "open"}  # fmt: skip
    return entry | fields


TIMELINE = [
    decision(0, g_lp=0.02, g_gt=-3.0, reward=-0.58, advantage=-1.0, status="used"),
    decision(1, g_lp=0.05, g_gt=-2.0, reward=-0.35, advantage=1.0, status="used"),
    decision(2, g_lp=0.01, g_gt=-2.5, reward=-0.49, status="scored"),
    decision(3),
]


def step_row(step: int) -> dict:
    return {"step": step, "loss": 0.5 / (step + 1), "mismatch_kl": 0.1, "top1_disagree": 0.2, "accuracy": 0.25,
            "probe_nll": 2.0 - 0.01 * step, "alpha": 0.3 + 0.05 * (step // 2), "weight_version": step + 1,
            "staleness": 0, "time_rollout_s": 1.5, "time_update_s": 0.5, "step_time_s": 2.5, "tokens_per_s": 40.0,
            "grad_norm": "nan", "total_steps": 8}  # fmt: skip


# -- the registry and its values -------------------------------------------------------------------


def test_registry_names_are_unique_prometheus_names():
    names = [s.name for s in SERIES]
    assert len(set(names)) == len(names)
    for s in SERIES:
        assert re.fullmatch(r"atesd_(controller|trainer)_[a-z0-9_]+", s.name), s.name
        assert s.kind in ("gauge", "counter") and s.help
        assert s.prometheus == "ray_" + s.name + ("_total" if s.kind == "counter" else "")


def test_beta_stats_match_the_beta_distribution():
    a, b = 2.5, 4.0
    dist = torch.distributions.Beta(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    )
    stats = beta_stats(a, b)
    assert stats["beta_mean"] == pytest.approx(float(dist.mean))
    assert stats["beta_std"] == pytest.approx(math.sqrt(float(dist.variance)))
    # differential entropy by numerical integration of -p log p
    x = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    p = dist.log_prob(x).exp()
    assert stats["policy_entropy"] == pytest.approx(float(torch.trapezoid(-p * p.log(), x)), abs=1e-6)


def test_controller_values_follow_the_timeline():
    values = controller_values(TIMELINE)
    current = TIMELINE[-1]
    assert values["alpha"] == pytest.approx(current["alpha"])
    assert values["beta_a"] == current["a"] and values["beta_b"] == current["b"]
    assert values["beta_mean"] == pytest.approx(current["a"] / (current["a"] + current["b"]))
    assert values["decisions"] == 4 and values["scored"] == 3
    # the latest scored decision's reward, the latest used decision's advantage
    assert (values["reward"], values["reward/g_lp"], values["reward/g_gt"]) == (-0.49, 0.01, -2.5)
    assert values["advantage"] == 1.0
    assert values["feature/progress"] == 0.75 and values["feature/probe_nll"] == 2.5
    # a controller without a Beta policy and nothing scored exports just what it has
    plain = controller_values(
        [{"decision": 0, "first_step": 0, "last_step": 3, "alpha": 0.5, "a": None, "b": None}]
    )
    assert plain == {"alpha": 0.5, "decisions": 1.0, "scored": 0.0}
    assert controller_values([]) == {}


def test_trainer_values_name_the_phases():
    values = trainer_values(3, step_row(3) | {"lr": 1e-5, "controller/alpha": 0.4})
    assert values == {
        "step": 3, "steps": 1, "loss": 0.125, "mismatch_kl": 0.1, "top1_disagree": 0.2, "accuracy": 0.25,
        "probe_nll": 1.97, "weight_version": 4, "staleness": 0, "tokens_per_s": 40.0,
        "phase/rollout": 1.5, "phase/update": 0.5, "phase/step": 2.5,
    }  # fmt: skip
    # grad_norm is non-finite (logged as the string "nan"); alpha, lr and controller/* are not trainer series


def test_every_value_key_has_a_series():
    """Each value lands in a series: a plain key, or ``<key>/<tag value>`` of a tagged one."""
    plain = {s.key for s in SERIES if s.tag is None}
    tagged = {s.key for s in SERIES if s.tag is not None}
    for values in (controller_values(TIMELINE), trainer_values(3, step_row(3))):
        for key in values:
            assert key in plain or key.split("/")[0] in tagged, key


# -- Grafana and Prometheus --------------------------------------------------------------------------


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out += [panel] + panel.get("panels", [])
    return [p for p in out if p.get("type") != "row"]


def test_grafana_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((DASHBOARD_DIR / "grafana_atesd.json").read_text())
    exported = {s.prometheus: s for s in SERIES}
    used = set()
    panels = _panels(dashboard)
    assert len(panels) >= 12
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_[a-z0-9_]+", target["expr"]))
            assert names, f"panel {panel['title']!r}: query names no metric: {target['expr']}"
            unknown = names - set(exported)
            assert not unknown, f"panel {panel['title']!r} queries {unknown}, which the code does not export"
            used |= names
            labels = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
            tags = set(RUN_TAGS) | {exported[n].tag for n in names if exported[n].tag}
            assert labels <= tags, f"panel {panel['title']!r} legend uses labels {labels - tags}"
    assert used == set(exported), f"series without a panel: {set(exported) - used}"
    run_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "run")
    assert set(re.findall(r"\bray_[a-z0-9_]+", run_var["definition"])) <= set(exported)


def test_prometheus_config_scrapes_rays_service_discovery_file():
    path = DASHBOARD_DIR / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    promtool = shutil.which("promtool")
    if promtool:
        subprocess.run([promtool, "check", "config", str(path)], check=True, capture_output=True)


# -- the live page's server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_yaml() -> str:
    cfg = make_config(*TINY, "trainer.total_steps=8", "algorithm=fixed_exposure", "algorithm.alpha=0.5")
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


@pytest.fixture
def run_dir(tmp_path, config_yaml):
    (tmp_path / "config.yaml").write_text(config_yaml)
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(step_row(s)) + "\n" for s in range(3))
    with open(tmp_path / "controller_timeline.jsonl", "w") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in TIMELINE)
    return tmp_path


@pytest.fixture
def server(run_dir):
    server = DashboardServer(run_dir, "127.0.0.1", 0).start()
    yield server
    server.stop()


def _get(url: str) -> tuple[int, dict | bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            status, headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        body, status, headers = err.read(), err.code, dict(err.headers)
    is_json = headers.get("Content-Type", "").startswith("application/json")
    return status, json.loads(body) if is_json else body, headers


def test_json_endpoints(server, run_dir):
    assert server.url.startswith("http://127.0.0.1:")
    status, metrics, headers = _get(server.url + "api/metrics")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert [r["step"] for r in metrics["rows"]] == [0, 1, 2] and metrics["last_step"] == 2
    assert metrics["rows"][1]["loss"] == pytest.approx(0.25)
    assert [r["step"] for r in _get(server.url + "api/metrics?since=2")[1]["rows"]] == [2]
    status, timeline, _ = _get(server.url + "api/timeline")
    assert status == 200 and timeline["decisions"] == TIMELINE
    status, info, _ = _get(server.url + "api/run")
    assert info == {"run": run_dir.name, "algorithm": "fixed_exposure", "model": "tiny", "controller": "fixed",
                    "hold": 4, "alpha_min": 0.1, "alpha_max": 1.0, "total_steps": 8}  # fmt: skip
    # steps appended while the page is open arrive on the next poll
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(step_row(3)) + "\n")
    assert [r["step"] for r in _get(server.url + "api/metrics?since=3")[1]["rows"]] == [3]
    assert _get(server.url + "api/metrics?since=x")[0] == 400
    assert _get(server.url + "api/nothing")[0] == 404


def test_page_and_assets_are_served_from_the_package(server):
    status, html, headers = _get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "style.css"):
        status, body, _ = _get(server.url + "static/" + name)
        assert status == 200 and body == (STATIC / name).read_bytes()
    # nothing is loaded from the network: no absolute URL but the SVG namespace
    for name in ("index.html", "app.js", "style.css"):
        urls = set(re.findall(r"https?://[^\s\"'`)]+", (STATIC / name).read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
    assert _get(server.url + "static/../server.py")[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_page_is_read_only(server, run_dir, method):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    for path in ("", "api/metrics", "api/timeline", "api/run"):
        request = urllib.request.Request(server.url + path, data=b'{"alpha": 1.0}', method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 405 and err.value.headers["Allow"] == "GET, HEAD"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_busy_port_falls_back_to_a_free_one(server, run_dir):
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    other = DashboardServer(run_dir, "127.0.0.1", port).start()
    try:
        assert other.url != server.url and _get(other.url + "api/run")[0] == 200
    finally:
        other.stop()


def test_metrics_tail_reads_appends_partial_lines_and_rewrites(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []
    path.write_text(json.dumps(step_row(0)) + "\n" + json.dumps(step_row(1))[:20])  # step 1 half written
    assert [r["step"] for r in tail.read()] == [0]
    path.write_text(json.dumps(step_row(0)) + "\n" + json.dumps(step_row(1)) + "\n")
    assert [r["step"] for r in tail.read()] == [0, 1]
    # a resumed run keeps step 0 and rewrites the rest, here growing past the old size
    rows = [step_row(0)] + [dict(step_row(s), loss=9.0) for s in range(1, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["step"], r["loss"]) for r in tail.read()][1:] == [(1, 9.0), (2, 9.0), (3, 9.0)]
    path.write_text(json.dumps(step_row(0)) + "\n")  # and shrinking
    assert [r["step"] for r in tail.read()] == [0]
    path.write_text(json.dumps(step_row(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        MetricsTail(path).read()


def test_render_timeline_png(run_dir):
    path = render_timeline(run_dir)
    assert path == run_dir / "controller_timeline.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1170, 900)
    (run_dir / "metrics.jsonl").unlink()
    assert render_timeline(run_dir) is None
