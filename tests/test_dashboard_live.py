"""Live monitoring of a real run (tiny model, local Ray cluster): headless Chromium watches the
page while the run trains, Ray's metrics agent serves the run's series, Prometheus scrapes them
and answers the shipped Grafana dashboard's queries, and the run leaves its PNG and TensorBoard
scalars behind."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from atesd_ray.modes.train import run
from controller.dashboard.live import RunMonitor
from controller.metrics import SERIES
from tests.browser import Chromium, find_chromium
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.ray

STEPS = 6
# ATESD with one decision per step, scored after the next step and learned from in pairs, so that
# rewards and advantages arrive within a few steps
RUN = [*TINY, f"trainer.total_steps={STEPS}", "trainer.save_every=100", "algorithm=atesd", "controller.hold=1",
       "controller.lookahead=1", "controller.batch_decisions=2", "dashboard.enabled=true", "dashboard.port=0",
       "tracking.backends=[console,jsonl,tensorboard]"]  # fmt: skip
EXPECTED = {s.prometheus for s in SERIES}
HOLD_S = 300
GRAFANA = Path(__file__).resolve().parents[1] / "controller" / "dashboard" / "grafana_atesd.json"
PAGE_STATE = """(() => {
  const alpha = document.getElementById("alpha-chart");
  return {points: Number(alpha.dataset.points), circles: alpha.querySelectorAll(".series-0 circle.point").length,
          rows: Number(document.body.dataset.metricRows), polls: Number(document.body.dataset.polls),
          status: document.getElementById("status").textContent, run: document.getElementById("run-name").textContent,
          lossPoints: Number(document.getElementById("loss-chart").dataset.points),
          guardrailPoints: Number(document.getElementById("guardrail-chart").dataset.points),
          lengthPoints: Number(document.getElementById("length-chart").dataset.points),
          bands: alpha.querySelectorAll("rect.band").length,
          betaCurve: document.querySelectorAll("#beta-chart .series-0 path").length,
          betaNote: document.getElementById("beta-note").textContent,
          rewards: Number(document.getElementById("reward-chart").dataset.points),
          features: Number(document.getElementById("features").dataset.features || 0)};
})()"""


class Tee(io.TextIOBase):
    """The run's stdout, kept for the test and passed through to the real stdout."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        with self.lock:
            self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)


def metrics_endpoint() -> str:
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    return f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"


def scrape(address: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text exposition -> {metric name: [(labels, value)]}, atesd series only."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out: dict[str, list[tuple[str, float]]] = {}
    for match in re.finditer(r"^(ray_atesd_\w+)\{(.*)\} (\S+)$", text, re.M):
        out.setdefault(match[1], []).append((match[2], float(match[3])))
    return out


def request(url: str, method: str = "GET") -> tuple[int, bytes]:
    data = b"{}" if method in ("POST", "PUT") else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Watcher(threading.Thread):
    """What a user does while the run trains: open the printed address in a browser, wait for the
    α series, take a screenshot, try to change something; meanwhile scrape Ray's metrics agent."""

    def __init__(self, out: Tee, base: Path, chromium: str, agent: str):
        super().__init__(daemon=True)
        self.out, self.base, self.chromium, self.agent = out, base, chromium, agent
        self.finished = threading.Event()
        self.done = threading.Event()  # the page was checked and every series seen (or it failed)
        self.error: BaseException | None = None
        self.page: dict | None = None
        self.seen: dict[str, list[tuple[str, float]]] = {}
        self.url = self.checked_at = self.all_seen_at = None
        self.methods: dict[str, int] = {}
        self.api: dict = {}

    def run(self) -> None:
        try:
            self.watch()
        except BaseException as err:  # re-raised by the fixture
            self.error = err
        finally:
            self.done.set()

    def record(self, step: int, metrics: dict) -> None:
        """As the run's watcher: after its last step's metrics are recorded, with every actor still
        alive, the run waits until the page has been checked and every series scraped, so what is
        seen is seen during the run however slow the machine (the wait is a liveness bound only)."""
        if step == STEPS - 1 and not self.done.wait(timeout=HOLD_S) and self.error is None:
            self.error = AssertionError(f"page and series not all seen within {HOLD_S} s of the last step")

    def finish(self) -> dict:
        return {}

    def wait_for_url(self) -> str:
        while not self.finished.is_set():
            found = re.search(r"^dashboard: (http://\S+)", self.out.text(), re.M)
            if found:
                return found[1]
            time.sleep(0.5)
        raise AssertionError("the run ended without printing the dashboard's address")

    def watch(self) -> None:
        self.url = self.wait_for_url()
        browser = Chromium(self.chromium, self.base / "chromium-profile")
        try:
            browser.open(self.url)
            while not self.finished.is_set():
                for name, samples in scrape(self.agent).items():
                    self.seen[name] = samples
                state = browser.evaluate(PAGE_STATE)
                if self.page is None and state["points"] >= 3 and state["rewards"] >= 1:
                    self.check_page(browser, state)
                if self.page is not None and EXPECTED <= set(self.seen):
                    self.all_seen_at = time.time()
                    return
                time.sleep(1.0)
        finally:
            browser.close()

    def check_page(self, browser: Chromium, state: dict) -> None:
        self.checked_at = time.time()
        self.page = dict(state, during_run=not self.finished.is_set())
        browser.screenshot(self.base / "dashboard.png")
        for method in ("POST", "PUT", "DELETE"):
            self.methods[method] = request(self.url + "api/timeline", method)[0]
        self.api = {
            name: json.loads(request(self.url + f"api/{name}")[1]) for name in ("metrics", "timeline", "run")
        }


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium (.ci/run installs Debian's: apt-get install -y chromium)")
    base = tmp_path_factory.mktemp("live")
    run_dir = base / "run"
    cfg = make_config(*RUN, f"run_dir={run_dir}")
    agent = metrics_endpoint()
    prometheus = Prometheus(base / "prometheus", agent) if shutil.which("prometheus") else None
    out = Tee(sys.stdout)
    watcher = Watcher(out, base, chromium, agent)
    watcher.start()
    started = time.time()
    try:
        # as `atesd-ray` runs a training job: with the live page (its monitor) as a watcher
        with contextlib.redirect_stdout(out), RunMonitor(cfg, run_dir) as monitor:
            summary = run(cfg, run_dir, watchers=[monitor, watcher])
            elapsed = time.time() - started
    finally:
        watcher.finished.set()
        watcher.join(timeout=60)
    try:
        if watcher.error is not None:
            raise watcher.error
        yield SimpleNamespace(run_dir=run_dir, summary=summary, watcher=watcher, out=out.text(), cfg=cfg,
                              prometheus=prometheus, started=started, elapsed=elapsed)  # fmt: skip
    finally:
        if prometheus is not None:
            prometheus.stop()


def test_page_draws_the_alpha_series_while_the_run_trains(live):
    w = live.watcher
    assert w.url.startswith("http://127.0.0.1:") and w.url.endswith("/")
    page = w.page
    assert page is not None, "the page never drew 3 points of the α series and a reward"
    assert page["during_run"], "the α series appeared only after the run had finished"
    assert page["circles"] == page["points"] >= 3
    assert page["rows"] >= page["points"] and page["lossPoints"] >= 3
    # the guardrails (fork rate first) and the rollouts' response length, one point per step like the loss
    assert page["guardrailPoints"] == page["lossPoints"] == page["lengthPoints"]
    assert page["bands"] >= page["points"]  # hold 1: one shaded window per decision
    assert page["betaCurve"] >= 1 and page["betaNote"].startswith("decision #")
    assert page["features"] == 7
    assert page["run"] == live.run_dir.name and page["status"].startswith(f"{page['rows']} steps")
    shot = live.run_dir.parent / "dashboard.png"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    print(f"screenshot: {shot}; page state: {page}; run took {live.elapsed:.0f} s")


def test_page_api_serves_the_run_and_refuses_changes(live):
    w = live.watcher
    assert w.methods == {"POST": 405, "PUT": 405, "DELETE": 405}
    rows = w.api["metrics"]["rows"]
    assert len(rows) >= 3 and [r["step"] for r in rows] == list(range(len(rows)))
    decisions = w.api["timeline"]["decisions"]
    assert len(decisions) >= len(rows)
    for row, decision in zip(
        rows, decisions[: len(rows)], strict=True
    ):  # each step trains at its decision's α
        assert decision["first_step"] == row["step"] and row["alpha"] == pytest.approx(decision["alpha"])
    assert w.api["run"]["total_steps"] == STEPS and w.api["run"]["controller"] == "atesd"


def test_ray_exports_the_runs_series(live):
    seen = live.watcher.seen
    assert EXPECTED <= set(seen), f"not exported: {EXPECTED - set(seen)}"
    run_label = f'run="{live.run_dir.name}"'
    for name in EXPECTED:
        assert any(run_label in labels and 'model="tiny"' in labels for labels, _ in seen[name]), name
    ((_, alpha),) = seen["ray_atesd_controller_alpha"]
    assert 0.1 <= alpha <= 1.0
    features = {
        re.search(r'feature="(\w+)"', labels)[1] for labels, _ in seen["ray_atesd_controller_feature"]
    }
    assert features == {
        "progress",
        "alpha",
        "loss",
        "mismatch_kl",
        "top1_disagree",
        "probe_nll",
        "confidence",
    }
    parts = {re.search(r'part="(\w+)"', labels)[1] for labels, _ in seen["ray_atesd_controller_reward_part"]}
    assert parts == {"g_lp", "g_gt"}
    phases = {re.search(r'phase="(\w+)"', labels)[1] for labels, _ in seen["ray_atesd_trainer_phase_seconds"]}
    assert {"rollout", "teacher", "update", "step"} <= phases


def test_grafana_queries_answer_from_prometheus(live):
    if live.prometheus is None:
        pytest.skip("no prometheus binary (make monitor installs Debian's prometheus)")
    dashboard = json.loads(GRAFANA.read_text())
    answered = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$run", re.escape(live.run_dir.name))
            names = set(re.findall(r"\bray_[a-z0-9_]+", expr))
            if names <= EXPECTED:
                answered[expr] = live.prometheus.query_range(expr, live.started, live.watcher.all_seen_at + 5)
    assert len(answered) >= 12
    empty = [expr for expr, result in answered.items() if not result]
    assert not empty, f"no data for: {empty}; scrapes: {live.prometheus.targets()}"


def test_run_leaves_png_tensorboard_and_controller_series(live):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    png = live.run_dir / "controller_timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"controller timeline: {png}" in live.out
    rows = [json.loads(line) for line in (live.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    timeline = [
        json.loads(line) for line in (live.run_dir / "controller_timeline.jsonl").read_text().splitlines()
    ]
    for row, decision in zip(rows, timeline, strict=True):
        assert row["controller/alpha"] == pytest.approx(decision["alpha"]) == pytest.approx(row["alpha"])
        assert row["controller/decisions"] == row["step"] + 1
        assert row["controller/beta_mean"] == pytest.approx(decision["a"] / (decision["a"] + decision["b"]))
    assert rows[-1]["controller/reward"] == pytest.approx(
        next(d["reward"] for d in reversed(timeline) if d["reward"] is not None)
    )
    (events,) = (live.run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events)).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "controller/alpha",
        "controller/beta_a",
        "controller/reward",
        "controller/feature/loss",
        "loss",
    } <= scalars
    assert [e.step for e in acc.Scalars("controller/alpha")] == list(range(STEPS))


class Prometheus:
    """A real Prometheus scraping the cluster's metrics agent every second. (On a loaded machine
    some scrapes time out, and Prometheus marks the target's series stale until the next one
    succeeds; so the test asks whether a query had data during the run, not at one instant.)"""

    def __init__(self, directory: Path, agent: str):
        directory.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = directory / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['{agent}']}}]}}]\n"
        )
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={directory / 'data'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert reply["status"] == "success", reply
        return reply["data"]

    def query_range(self, expr: str, start: float, end: float) -> list:
        return self.api("query_range", query=expr, start=start, end=end, step=1)["result"]

    def targets(self) -> list[tuple[str, str]]:
        return [(t["health"], t["lastError"]) for t in self.api("targets")["activeTargets"]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
