"""Render actors that batch: several rows in flight in one actor's engine, on a real local Ray."""

from __future__ import annotations

import numpy as np
from test_pipeline_run import (
    SEGMENT_BLOCKS,
    WORKERS,
    is_block,
    kill_the_render_actor,
    make_audio,
    make_portrait,
    settings,
    workers_held_at,
)

from model.media import read_video
from pipeline.events import RowStarted
from pipeline.job import JobSpec, run_job

PIXEL_TOLERANCE = 2  # grey levels: rows of a batch differ from their solo renders only by matmul rounding


def rows(tmp_path) -> list[dict]:
    out = []
    for i, seconds in enumerate((1.2, 2.0, 0.7)):
        make_portrait(tmp_path / f"face-{i}.png", seed=i)
        make_audio(tmp_path / f"speech-{i}.wav", seconds, seed=i)
        out.append({"id": f"row-{i}", "portrait": str(tmp_path / f"face-{i}.png"),
                    "audio": str(tmp_path / f"speech-{i}.wav"), "seed": i})  # fmt: skip
    return out


def test_rows_per_actor_renders_the_same_videos_together(ray_cluster, tmp_path):
    job = rows(tmp_path)
    one = run_job(JobSpec(job_id="batch-1", rows=job, output=str(tmp_path / "one")), settings(), WORKERS)
    three = run_job(  # decode and encode on the actor's second thread too (on a GPU by default; forced here)
        JobSpec(job_id="batch-3", rows=job, output=str(tmp_path / "three"), options={"rows_per_actor": 3}),
        settings(overlap_decode="on"),
        WORKERS,
    )
    assert one.counts == three.counts == {"succeeded": 3}
    assert [r.rows_in_batch for r in one.rows] == [1, 1, 1]
    assert max(r.rows_in_batch for r in three.rows) == 3  # all three were in the engine together at some step
    for row in job:
        solo, _ = read_video(tmp_path / "one" / f"{row['id']}.mp4")
        batched, _ = read_video(tmp_path / "three" / f"{row['id']}.mp4")
        assert solo.shape == batched.shape
        assert np.abs(solo.astype(int) - batched.astype(int)).max() <= PIXEL_TOLERANCE


def test_a_killed_batching_actor_resumes_every_row_from_its_segments(ray_cluster, tmp_path):
    job = rows(tmp_path)[:2]
    spec = JobSpec(job_id="batch-kill", rows=job, output=str(tmp_path / "out"), options={"rows_per_actor": 2})
    events, killed = [], []

    def on_event(event) -> None:  # the actor is held at row-1's block after its first segment until the kill
        events.append(event)
        if not killed and is_block(event, "row-1", SEGMENT_BLOCKS - 1):
            killed.append(kill_the_render_actor(spec.job_id))

    report = run_job(spec, settings(), workers_held_at("row-1", SEGMENT_BLOCKS - 1), on_event=on_event)
    assert killed and report.counts == {"succeeded": 2}, report.rows
    starts = {}
    for event in events:
        if isinstance(event, RowStarted):
            starts.setdefault(event.row_id, []).append(event.resumed_from_block)
    assert any(len(s) == 2 and s[1] > 0 for s in starts.values()), starts  # a row in flight resumed mid-way
    reference = run_job(JobSpec(job_id="batch-ref", rows=job, output=str(tmp_path / "ref")), settings(), WORKERS)
    assert reference.counts == {"succeeded": 2}
    for row in job:
        resumed, _ = read_video(tmp_path / "out" / f"{row['id']}.mp4")
        solo, _ = read_video(tmp_path / "ref" / f"{row['id']}.mp4")
        assert resumed.shape == solo.shape
        assert np.abs(resumed.astype(int) - solo.astype(int)).max() <= PIXEL_TOLERANCE
