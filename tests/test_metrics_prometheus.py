"""A real Prometheus (the Debian package) scrapes the service on loopback while a real job renders; PromQL over
its HTTP API then returns the frames rendered, and every query of the Grafana dashboard returns data for the
time the job ran (so deploy/grafana/dashboard.json is known to work where Grafana exists)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from test_pipeline_run import HOLD_LIMIT_S, workers_held_at
from test_service_jobs import FPS, ServiceThread, free_port, make_inputs, service_settings, wait_for

from cli.main import main
from deploy.app import create_app

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"


def service_output_root(tmp_path) -> str:
    return f"file://{(tmp_path / 'state' / 'outputs').resolve()}/"


# The series this test's job feeds (frames, video-seconds, rows, a failed row, a refused request, stage and block
# times, fps); every dashboard query over them must show a value above zero. (The queue depth may be sampled
# at zero only: one scrape a second can miss a short job's queue.)
FED_BY_THE_JOB = (
    "frames_rendered_total",
    "video_seconds_rendered_total",
    "rows_total",
    "row_failures_total",
    "requests_rejected_total",
    "stage_seconds",
    "block_generate_seconds",
    "actor_fps",
)
SCRAPE_INTERVAL = "1s"  # fast, so several scrapes land while a few-second job runs
STEP_S = 1.0  # the resolution of the dashboard's range queries here
PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    def __init__(self, workdir, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {"job_name": "avatar-render", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
            ],
        }
        workdir.mkdir()
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.args = [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.log = open(workdir / "prometheus.log", "wb")

    def __enter__(self) -> Prometheus:
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, "prometheus exited; see prometheus.log"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()

    def query(self, promql: str) -> float | None:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        params = {"query": promql, "start": start, "end": end, "step": step}
        body = httpx.get(f"{self.url}/api/v1/query_range", params=params, timeout=10).json()
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of the Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


@pytest.mark.skipif(PROMETHEUS is None, reason="needs the Debian prometheus package (make system-deps)")
def test_prometheus_scrapes_frames_while_a_job_runs(ray_cluster, tmp_path, monkeypatch):
    import ray

    from pipeline.job import progress_actor_name

    seconds = 2.0
    media = make_inputs(tmp_path / "in", seconds)
    port = free_port()
    # A rate needs two samples of the row's frames, one before its last block: the render actor waits at block 1
    # until a scrape has seen frames (on a fast machine the whole row fits between two scrapes).
    monkeypatch.setattr("actors.job_workers", lambda: workers_held_at("a", 1))
    with (
        ServiceThread(create_app(service_settings(tmp_path)), port) as service,
        Prometheus(tmp_path / "prometheus", f"127.0.0.1:{port}") as prometheus,
    ):
        # A refused request and a row that fails: the dashboard's failure panels have something to show. (After
        # a first scrape: Prometheus never counts a series' first sample, so a refusal before it shows as no rise.)
        wait_for(
            lambda: {"state": "", "up": prometheus.query('up{job="avatar-render"}')},
            lambda s: s["up"] == 1,
            "a first scrape of the service",
        )
        assert httpx.post(f"{service.url}/v1/jobs", json={"rows": []}).status_code == 422
        # The job goes in through the CLI client, which follows it to the end (exit 1: a row failed).
        manifest = tmp_path / "job.jsonl"
        missing = {"id": "b", "portrait": media["portrait"], "audio": str(tmp_path / "in" / "gone.wav")}
        manifest.write_text(json.dumps({"id": "a", **media}) + "\n" + json.dumps(missing) + "\n")

        released = []

        def release_once_scraped() -> None:
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not (prometheus.query("sum(avatar_render_frames_rendered_total)") or 0) > 0:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)
            (running,) = httpx.get(f"{service.url}/v1/jobs").json()["jobs"]
            ray.get(ray.get_actor(progress_actor_name(running["job_id"])).release.remote())
            released.append(running["job_id"])

        releaser = threading.Thread(target=release_once_scraped, daemon=True)
        releaser.start()
        assert main(["submit", str(manifest), "--url", service.url, "--wait", "--poll", "0.2"]) == 1
        releaser.join()
        assert released, "no scrape saw the held row's frames"
        (job,) = httpx.get(f"{service.url}/v1/jobs").json()["jobs"]
        assert job["state"] == "succeeded" and job["frames"] == int(seconds * FPS), job
        assert job["counts"] == {"succeeded": 1, "failed": 1}, job
        assert job["output"].startswith(service_output_root(tmp_path))

        # Wait for a scrape after the job ended, then ask Prometheus.
        # (Frames and the finished rows are separate events: one scrape can fall between them, so wait for all.)
        frames = wait_for(
            lambda: {
                "state": "",
                "frames": prometheus.query("sum(avatar_render_frames_rendered_total)"),
                "rows": prometheus.query('avatar_render_rows_total{status="succeeded"}'),
                "failed": prometheus.query('sum(avatar_render_row_failures_total{kind="input"})'),
            },
            lambda s: s["frames"] == seconds * FPS and s["rows"] == 1 and s["failed"] == 1,
            "Prometheus to see every frame and both rows",
        )["frames"]
        assert frames == int(seconds * FPS)
        assert prometheus.query('max_over_time(avatar_render_jobs{state="running"}[10m])') == 1  # seen mid-job
        assert prometheus.query("sum(avatar_render_video_seconds_rendered_total)") == pytest.approx(seconds)
        assert prometheus.query('avatar_render_rows_total{status="succeeded"}') == 1
        assert prometheus.query("max(avatar_render_actor_fps)") > 0
        assert prometheus.query('up{job="avatar-render"}') == 1

        # Every query of the Grafana dashboard, evaluated at each second from the job's start through the scrape
        # that saw it end (a rate needs two samples, which a job of a few seconds may only give by then), returns
        # data: some series with a finite value (a quantile over no observations is NaN, which Grafana draws as
        # nothing). The counters start at zero, so "has data" alone would pass for a panel nothing fed: each panel
        # the job feeds must also rise above zero. The range ends one step past that scrape's sample: steps fall
        # at start + k seconds, and on a fast machine the last one before "now" can precede it.
        queries = dashboard_queries()
        assert len(queries) >= 8 and not [q for _, q in queries if "$" in q]  # no Grafana variables to fill in
        empty, flat = [], []
        ended_seen = prometheus.query('timestamp(avatar_render_rows_total{status="succeeded"})')
        until = max(time.time(), ended_seen + STEP_S)
        for title, promql in queries:
            series = prometheus.query_range(promql, job["started"], until, STEP_S)
            values = [float(v) for s in series for _, v in s["values"]]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {promql} -> {str(series)[:200]}")
            if any(name in promql for name in FED_BY_THE_JOB) and not any(v > 0 for v in values):
                flat.append(f"{title}: {promql} never above 0 -> {str(series)[:200]}")
        assert empty == [], "\n".join(empty)
        assert flat == [], "\n".join(flat)
        assert {title for title, q in queries if any(name in q for name in FED_BY_THE_JOB)} >= {
            "Throughput: frames / s",
            "Rows finished by status",
            "Block generation time (p50, p99)",
        }
