"""Metrics fed from real pipeline events through the job manager's event path, read back from /metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from deploy.app import create_app
from deploy.settings import ServiceSettings
from pipeline.events import BlockRendered, RowFinished, RowResult, RowStarted, RowStatus, StageTimed


def feed_job_events(manager, job_id: str) -> None:
    """What a two-actor job reports: blocks from both actors, stage timings, one success, one failure."""
    events = [
        RowStarted(job_id, "a", "actor-1", 0),
        RowStarted(job_id, "b", "actor-2", 0),
        BlockRendered(job_id, "a", "actor-1", 0, frames=9, video_seconds=0.36, generate_seconds=0.5),
        BlockRendered(job_id, "a", "actor-1", 1, frames=12, video_seconds=0.48, generate_seconds=0.4),
        BlockRendered(job_id, "b", "actor-2", 0, frames=9, video_seconds=0.36, generate_seconds=0.3),
        StageTimed(job_id, "fetch", 0.2),
        StageTimed(job_id, "render", 1.5),
        StageTimed(job_id, "write", 0.05),
        RowFinished(
            job_id,
            RowResult(
                id="a",
                status=RowStatus.SUCCEEDED,
                output="file:///out/a.mp4",
                frames=21,
                video_seconds=0.84,
                duration_s=1.5,
                timings={"render": 1.5},
                metrics={"lipsync_r": 0.5},
            ),
        ),
        RowFinished(
            job_id,
            RowResult(id="b", status=RowStatus.FAILED, error="b.wav: cannot decode audio", error_kind="input"),
        ),
    ]
    for event in events:
        manager.handle_event(job_id, event)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_events_drive_metrics_and_row_records(tmp_path):
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path), run_jobs=False), base_url="http://127.0.0.1") as c:
        rows = [{"id": i, "portrait": "/p.png", "audio": "/a.wav"} for i in ("a", "b", "c")]
        job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
        manager = c.app.state.manager
        feed_job_events(manager, job_id)
        got = samples(c.get("/metrics").text)

        assert got[("avatar_render_frames_rendered_total", (("actor", "actor-1"),))] == 21
        assert got[("avatar_render_frames_rendered_total", (("actor", "actor-2"),))] == 9
        assert abs(got[("avatar_render_video_seconds_rendered_total", (("actor", "actor-1"),))] - 0.84) < 1e-9
        assert got[("avatar_render_actor_fps", (("actor", "actor-1"),))] == 12 / 0.4  # the latest block
        assert got[("avatar_render_actor_fps", (("actor", "actor-2"),))] == 9 / 0.3
        assert got[("avatar_render_rows_total", (("status", "succeeded"),))] == 1
        assert got[("avatar_render_rows_total", (("status", "failed"),))] == 1
        assert got[("avatar_render_row_failures_total", (("kind", "input"),))] == 1
        assert got[("avatar_render_stage_seconds_count", (("stage", "render"),))] == 1
        assert got[("avatar_render_stage_seconds_bucket", (("le", "2.5"), ("stage", "render")))] == 1
        assert got[("avatar_render_stage_seconds_bucket", (("le", "1.0"), ("stage", "render")))] == 0
        assert got[("avatar_render_block_generate_seconds_count", ())] == 3
        assert got[("avatar_render_jobs", (("state", "queued"),))] == 1
        assert got[("avatar_render_queue_rows", ())] == 1  # 3 rows, 2 finished

        # The same events became row records: finished rows are stored, status counts follow.
        status = c.get(f"/v1/jobs/{job_id}").json()
        assert status["counts"] == {"succeeded": 1, "failed": 1, "pending": 1}
        assert status["frames"] == 21 and abs(status["progress"] - 2 / 3) < 1e-9
        listed = {r["id"]: r for r in c.get(f"/v1/jobs/{job_id}/rows").json()["rows"]}
        assert listed["a"]["output"] == "file:///out/a.mp4" and listed["a"]["timings"] == {"render": 1.5}
        assert listed["a"]["metrics"] == {"lipsync_r": 0.5} and listed["a"]["duration_s"] == 1.5
        assert listed["b"]["error_kind"] == "input" and "b.wav" in listed["b"]["error"]


def test_each_app_owns_its_registry(tmp_path):
    first = create_app(ServiceSettings(state_dir=tmp_path / "one"), run_jobs=False)
    second = create_app(ServiceSettings(state_dir=tmp_path / "two"), run_jobs=False)  # no duplicate-name error
    first.state.metrics.frames.labels("x").inc(5)
    assert first.state.metrics.registry is not second.state.metrics.registry
    assert b'avatar_render_frames_rendered_total{actor="x"} 5.0' in first.state.metrics.exposition()
    assert b'actor="x"' not in second.state.metrics.exposition()
