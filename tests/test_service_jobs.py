"""Jobs through the service end to end on a real local Ray: a job outlives a restart of the service and
resumes from its stored segments; a running job is cancelled at the next block."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_pipeline_run import is_block, workers_held_at

from deploy.app import create_app
from deploy.settings import ServiceSettings
from deploy.store import JobStore
from model.media import probe, save_wav
from pipeline.events import RowFinished, RowStarted
from pipeline.settings import PipelineSettings

SAMPLE_RATE = 16000
FPS = 25  # the tiny preset's frame rate
TERMINAL = ("succeeded", "failed", "cancelled")
DEADLINE_S = 240  # bound on every wait; a render of a few seconds takes far less


def make_inputs(directory, seconds: float) -> dict:
    """A random 64x64 portrait and a voiced tone of `seconds`: a valid row's media."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(directory / "face.png")
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    save_wav(
        directory / "speech.wav", 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2, SAMPLE_RATE
    )
    return {"portrait": str(directory / "face.png"), "audio": str(directory / "speech.wav")}


def service_settings(tmp_path, **overrides) -> ServiceSettings:
    # One block per segment: every block rendered is a point a resumed row can continue from.
    pipeline = PipelineSettings(segment_blocks=1, num_actors=1)
    return ServiceSettings(state_dir=tmp_path / "state", pipeline=pipeline, **overrides)


def wait_for(get_status, predicate, what: str) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        status = get_status()
        if predicate(status):
            return status
        assert status["state"] not in TERMINAL or predicate(status), f"ended before {what}: {status}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {status}")


def record_events(app) -> list:
    """Keep a copy of every pipeline event the manager handles (its real handling still runs)."""
    manager, seen = app.state.manager, []
    handle = manager.handle_event

    def recording(job_id, event):
        seen.append(event)
        handle(job_id, event)

    manager.handle_event = recording
    return seen


def held_at(client, events: list, job_id: str, row_id: str, block_index: int) -> None:
    """Wait until the job's render actor is held at that block (`workers_held_at`; `events` recorded from before the
    job was posted): the job is running there."""
    wait_for(
        lambda: {"state": client.get(f"/v1/jobs/{job_id}").json()["state"],
                 "held": any(is_block(e, row_id, block_index) for e in events)},
        lambda s: s["held"],
        f"{row_id}'s block {block_index}",
    )  # fmt: skip


def test_job_outlives_a_service_restart_and_resumes(ray_cluster, tmp_path, monkeypatch):
    seconds = 3.0
    media = make_inputs(tmp_path / "in", seconds)
    rows = [{"id": "long", **media}, {"id": "missing", "portrait": media["portrait"], "audio": "/nowhere.wav"}]
    settings = service_settings(tmp_path)
    # The render actor waits at block 1 (segments stored up to it) until the service's stop interrupts the job, on
    # any machine. The second attempt resumes after it, so it is not held again.
    monkeypatch.setattr("actors.job_workers", lambda: workers_held_at("long", 1))

    app = create_app(settings)
    events = record_events(app)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
        held_at(c, events, job_id, "long", 1)
    # The service stopped mid-job: the job is kept, queued to run again, not cancelled.
    store = JobStore(settings.state_dir)
    interrupted = store.get(job_id)
    store.close()
    assert interrupted.state == "queued" and interrupted.attempts == 1 and not interrupted.cancel_requested

    app = create_app(settings)
    events = record_events(app)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert job_id in [job["job_id"] for job in c.get("/v1/jobs").json()["jobs"]]
        done = wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json(), lambda s: s["state"] in TERMINAL, "the end")
        rows_out = {r["id"]: r for r in c.get(f"/v1/jobs/{job_id}/rows").json()["rows"]}

    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    assert done["counts"] == {"succeeded": 1, "failed": 1} and done["progress"] == 1.0
    long = rows_out["long"]
    assert long["status"] == "succeeded" and long["frames"] == int(seconds * FPS)
    # Started once in the second attempt, after the segments the first one stored: the row list says so.
    assert long["render_attempts"] == 1 and long["resumed_from_segment"] >= 0, long
    info = probe(long["output"].removeprefix("file://"))
    assert info["frames"] == int(seconds * FPS) and info["has_audio"]
    assert rows_out["missing"]["status"] == "failed" and rows_out["missing"]["error_kind"] == "input"
    assert "nowhere.wav" in rows_out["missing"]["error"]
    # The second attempt continued the row from its stored segments instead of starting over.
    restarts = [e for e in events if isinstance(e, RowStarted) and e.row_id == "long"]
    assert restarts and restarts[0].resumed_from_block == 2, restarts  # segments 0 and 1 were stored when held


def test_cancel_stops_a_running_job_at_the_next_block(ray_cluster, tmp_path, monkeypatch):
    seconds = 3.0
    media = make_inputs(tmp_path / "in", seconds)
    monkeypatch.setattr("actors.job_workers", lambda: workers_held_at("talk", 1))  # running until the cancel
    app = create_app(service_settings(tmp_path))
    events = record_events(app)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        job_id = c.post("/v1/jobs", json={"rows": [{"id": "talk", **media}]}).json()["job_id"]
        held_at(c, events, job_id, "talk", 1)
        response = c.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 202 and response.json()["cancel_requested"]
        done = wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json(), lambda s: s["state"] in TERMINAL, "the end")
        (row,) = c.get(f"/v1/jobs/{job_id}/rows").json()["rows"]
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 202  # cancelling a cancelled job is a no-op
        metrics = c.get("/metrics").text
    assert done["state"] == "cancelled", done
    assert row["status"] == "cancelled" and row["output"] is None, row
    assert row["error"].startswith("cancelled after 2 blocks"), row  # at the block it was held at
    assert 'avatar_render_rows_total{status="cancelled"} 1.0' in metrics
    assert 'avatar_render_jobs{state="cancelled"} 1.0' in metrics


def test_a_finished_row_shows_its_metrics_timings_and_duration_while_the_job_runs(ray_cluster, tmp_path):
    """GET /v1/jobs/{id}/rows, asked over HTTP the moment the row's RowFinished event is handled (the job is still
    running, its report not written): the row already carries what report.jsonl will say."""
    import httpx

    seconds = 2.0
    media = make_inputs(tmp_path / "in", seconds)
    app = create_app(service_settings(tmp_path))
    manager, seen = app.state.manager, []
    handle = manager.handle_event

    def handle_and_look(job_id, event):
        handle(job_id, event)
        if isinstance(event, RowFinished):
            job = httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=10).json()
            rows = httpx.get(f"{service.url}/v1/jobs/{job_id}/rows", timeout=10).json()["rows"]
            seen.append((job["state"], rows))

    manager.handle_event = handle_and_look
    with ServiceThread(app, free_port()) as service:
        job_id = httpx.post(f"{service.url}/v1/jobs", json={"rows": [{"id": "talk", **media}]}).json()["job_id"]
        get_status = lambda: httpx.get(f"{service.url}/v1/jobs/{job_id}", timeout=10).json()  # noqa: E731
        done = wait_for(get_status, lambda s: s["state"] in TERMINAL, "the end")
        (final,) = httpx.get(f"{service.url}/v1/jobs/{job_id}/rows", timeout=10).json()["rows"]
    assert done["state"] == "succeeded", done

    ((state, (live,)),) = seen
    assert state == "running"
    assert live["status"] == "succeeded" and live["frames"] == int(seconds * FPS)
    assert {"fetch", "render", "generate", "write"} <= set(live["timings"]), live
    assert live["duration_s"] == pytest.approx(sum(v for k, v in live["timings"].items() if k != "generate"))
    assert live["duration_s"] > 0
    assert {"lipsync_r", "identity_error", "boundary_jitter"} <= set(live["metrics"]), live
    # The report, stored again when the job ended, says the same.
    with open(done["output"].removeprefix("file://").rstrip("/") + "/report.jsonl") as f:
        report = json.loads(f.read())
    assert final == live and {k: report[k] for k in live} == live


# -- helpers shared with the Prometheus test ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceThread:
    """The app served by uvicorn on a loopback port, in a thread (what `avatar-render serve --uvicorn` runs)."""

    def __init__(self, app, port: int):
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
