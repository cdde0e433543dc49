"""The whole pipeline on a real local Ray: failure isolation, S3 in and out, idempotency, cancel, resume.

Renders are small (the suite's seeded random 64x64 model, conftest.py; ~1 s of audio) so each row takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import numpy as np
from PIL import Image
from test_security import make_playlist, silent_flac

from actors import job_workers
from model.media import read_video, save_wav
from model.media.video import VideoWriter
from pipeline.events import BlockRendered, RowFinished, RowStarted
from pipeline.job import JobSpec, run_job
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore

SAMPLE_RATE = 16000
WORKERS = job_workers()
SEGMENT_BLOCKS = 2  # K: small, so a 1-2 s row has several segments


HOLD_LIMIT_S = 60.0  # a held render actor goes on by itself after this (a test that never releases it fails, not hangs)


def workers_held_at(row_id: str, block_index: int):
    """Job workers whose progress actor holds the render actor once, at one block of one row: that block's events
    are in the log (the driver relays them) but the answer to its push waits until the test calls `release` or the
    job is cancelled. What the test does on seeing the block (a kill, a cancel) then lands at that block on any
    machine; reacting to the relayed event alone lands up to a poll or two later (pipeline.job.POLL_SECONDS), and a
    fast machine renders a small row's remaining blocks meanwhile."""
    import ray

    from actors.progress import ProgressLog

    class HoldingProgressLog(ProgressLog):  # defined here, so that Ray ships it by value to its worker
        def __init__(self, job_id: str):
            super().__init__(job_id)
            self.held = self.released = False

        def push_and_check(self, events: list) -> bool:
            self.push(events)
            if not self.held and any(
                isinstance(e, BlockRendered) and e.row_id == row_id and e.block_index == block_index for e in events
            ):
                self.held = True
                deadline = time.monotonic() + HOLD_LIMIT_S
                while not (self.released or self.cancelled) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return self.cancelled

        def release(self) -> None:
            self.released = True

    # A second thread serves the driver's polls, the cancel and the release while a push is held.
    held = ray.remote(num_cpus=0, max_concurrency=2)(HoldingProgressLog)
    return dataclasses.replace(WORKERS, progress_actor=held)


def is_block(event, row_id: str | None, block_index: int) -> bool:
    return isinstance(event, BlockRendered) and row_id in (None, event.row_id) and event.block_index == block_index


def make_portrait(path, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_audio(path, seconds: float, seed: int = 0) -> None:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).standard_normal(t.size)
    save_wav(path, 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2 + 0.02 * noise, SAMPLE_RATE)


def settings(**update) -> PipelineSettings:
    return PipelineSettings(segment_blocks=SEGMENT_BLOCKS, num_actors=1, **update)


def test_a_segment_is_seconds_of_video_whatever_the_models_block():
    """K defaults to the blocks of about SEGMENT_SECONDS of video: tiny's blocks are 3 frames (stride-1 VAE), Wan2.1's
    12, so a fixed block count would make segments 4x apart in length. An explicit K is kept as given."""
    from model.config import get_preset
    from pipeline.settings import SEGMENT_SECONDS

    lengths = {}
    for name in ("tiny", "wan2.1-1.3b"):
        preset = get_preset(name)
        block_seconds = preset.generator.frames_per_block * preset.vae.temporal_stride / preset.video.fps
        lengths[name] = PipelineSettings().segment_blocks_for(preset) * block_seconds
        assert abs(lengths[name] - SEGMENT_SECONDS) <= block_seconds / 2, (name, lengths[name])
        assert PipelineSettings(segment_blocks=2).segment_blocks_for(preset) == 2
    assert PipelineSettings().segment_blocks_for(get_preset("tiny")) == 33


def test_bad_rows_fail_alone_and_exit_code_says_so(ray_cluster, tmp_path, monkeypatch, capsys):
    from cli.main import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    make_portrait(inputs / "face.png")
    make_audio(inputs / "speech.wav", 1.0)
    (inputs / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(300))
    (inputs / "text.png").write_text("this is not an image")
    save_wav(inputs / "empty.wav", np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    Image.new("RGB", (8, 8)).save(inputs / "tiny.png")
    make_playlist(inputs, tmp_path / "elsewhere")  # in/speech.m3u8, its segments outside in/
    silent_flac(inputs / "long.flac", 120)
    with VideoWriter(inputs / "truth.mp4", 25, 128, 128) as truth:  # twice the render's size: fitted to it
        truth.write(np.repeat(np.asarray(Image.open(inputs / "face.png").resize((128, 128)))[None], 25, axis=0))
    good = {"portrait": "in/face.png", "audio": "in/speech.wav"}
    rows = [
        {"id": "good-1", **good, "truth_video": "in/truth.mp4"},
        {"id": "missing-file", "portrait": "in/face.png", "audio": "in/nowhere.wav"},
        {"id": "corrupt-audio", "portrait": "in/face.png", "audio": "in/corrupt.wav"},
        {"id": "not-an-image", "portrait": "in/text.png", "audio": "in/speech.wav"},
        {"id": "zero-length", "portrait": "in/face.png", "audio": "in/empty.wav"},
        {"id": "good-1", **good, "seed": 3},
        {"id": "unknown-column", **good, "voice": "deep"},
        {"id": "good-2", **good, "seed": 5, "truth_video": "in/no-truth.mp4"},
        {"id": "tiny-portrait", "portrait": "in/tiny.png", "audio": "in/speech.wav"},
        {"id": "playlist", "portrait": "in/face.png", "audio": "in/speech.m3u8"},
        {"id": "too-long", "portrait": "in/face.png", "audio": " in/long.flac"},
    ]
    manifest = tmp_path / "job.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("AVATAR_RENDER_SEGMENT_BLOCKS", str(SEGMENT_BLOCKS))
    monkeypatch.setenv("AVATAR_RENDER_LIMITS__MAX_AUDIO_SECONDS", "60")

    assert main(["run", str(manifest), "--output", str(tmp_path / "out")]) == 1

    lines = [json.loads(line) for line in open(tmp_path / "out" / "report.jsonl")]
    assert [r["id"] for r in lines] == [r["id"] for r in rows]  # one report row per manifest row, in order
    duplicate = lines[5]
    assert duplicate["status"] == "failed" and "duplicate id (first used by row 1)" in duplicate["error"]
    report = {r["id"]: r for r in lines[:5] + lines[6:]}
    for row_id in ("good-1", "good-2"):
        assert report[row_id]["status"] == "succeeded", report[row_id]
        frames, _ = read_video(tmp_path / "out" / f"{row_id}.mp4")
        assert len(frames) == 25 == report[row_id]["frames"]  # 1 s at 25 fps
        metrics = report[row_id]["metrics"]  # quality numbers of the rendered video, from model.eval
        assert metrics["lipsync_reference"] == "envelope" and 0 <= metrics["identity_error"] <= 1
    # A row's truth video gives the PSNR against it beside the still portrait's (printed too); one that cannot be read
    # costs those numbers only.
    truth = report["good-1"]["metrics"]
    assert truth["truth_frames"] == 25 and all(10 < truth[k] < 100 for k in ("truth_psnr", "still_truth_psnr"))
    # The truth is one picture held for 25 frames: the still scores the same against each of them.
    assert abs(truth["still_truth_psnr"] - truth["still_truth_psnr_frame0"]) < 0.1
    assert "truth_psnr" not in report["good-2"]["metrics"] and "lipsync_r" in report["good-2"]["metrics"]
    assert "no-truth.mp4: truth video file not found" in report["good-2"]["metrics"]["truth_video_error"]
    expected = {
        "missing-file": ("input", "nowhere.wav: audio file not found"),
        "corrupt-audio": ("input", "corrupt.wav: cannot decode audio"),
        "not-an-image": ("input", "text.png: not an image"),
        "zero-length": ("input", "empty.wav"),
        "unknown-column": ("validation", "unknown column(s) 'voice'"),
        "tiny-portrait": ("input", "tiny.png: image is 8x8 pixels; a portrait needs at least 32 px"),
        "playlist": ("input", "speech.m3u8: cannot decode audio: not a supported audio format"),
        "too-long": ("input", "long.flac: audio lasts longer than the limit of 60 s"),
    }
    for row_id, (kind, text) in expected.items():
        assert report[row_id]["status"] == "failed" and report[row_id]["error_kind"] == kind, report[row_id]
        assert text in report[row_id]["error"], report[row_id]["error"]
    out = capsys.readouterr().out
    assert "11 rows: 9 failed, 2 succeeded" in out
    assert (
        f"good-1: PSNR against the truth video (25 frames): render {truth['truth_psnr']:.2f} dB, still portrait " in out
    )
    assert not os.listdir(tmp_path / "out" / ".segments")  # finished rows leave no segments


def test_s3_job_is_idempotent_and_force_rerenders(ray_cluster, s3_server, s3_bucket, s3_raw, tmp_path):
    store = ObjectStore(s3_server)
    make_portrait(tmp_path / "face.png")
    make_audio(tmp_path / "speech.wav", 1.0)
    store.put_file(f"{s3_bucket}/in/face.png", tmp_path / "face.png")
    store.put_file(f"{s3_bucket}/in/speech.wav", tmp_path / "speech.wav")
    store.put_bytes(f"{s3_bucket}/jobs/job.csv", b"id,portrait,audio,prompt\nclip,../in/face.png,../in/speech.wav,hi\n")
    spec = JobSpec(job_id="s3-job", manifest=f"{s3_bucket}/jobs/job.csv", output=f"{s3_bucket}/out")
    job_settings = settings(storage=s3_server)
    events = []

    first = run_job(spec, job_settings, WORKERS, on_event=events.append)
    assert first.counts == {"succeeded": 1}, first.rows
    row = first.rows[0]
    assert row.output == f"{s3_bucket}/out/clip.mp4" and row.frames == 25
    assert {"fetch", "render", "write"} <= set(row.timings)
    kinds = [type(e) for e in events if getattr(e, "row_id", None) == "clip"]
    assert kinds[0] is RowStarted and kinds[-1] is RowFinished and BlockRendered in kinds
    video = tmp_path / "clip.mp4"
    store.get_file(row.output, video)
    assert len(read_video(video)[0]) == 25
    assert store.list(f"{s3_bucket}/out/.segments") == []
    bucket = s3_bucket[len("s3://") :]
    assert {o["Key"] for o in s3_raw.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]} == {
        "out/clip.mp4",
        "out/report.jsonl",
        "out/report.parquet",
    }

    second = run_job(spec, job_settings, WORKERS)
    assert second.counts == {"skipped": 1}
    assert second.rows[0].output == row.output

    forced = run_job(spec.model_copy(update={"force": True}), job_settings, WORKERS)
    assert forced.counts == {"succeeded": 1}

    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.get_bytes(f"{s3_bucket}/out/report.parquet")))
    assert table.column("status").to_pylist() == ["succeeded"]
    assert json.loads(table.column("timings")[0].as_py())["render"] > 0


def test_cancel_keeps_segments_and_the_next_run_resumes(ray_cluster, tmp_path):
    make_portrait(tmp_path / "face.png")
    make_audio(tmp_path / "speech.wav", 2.0)
    spec = JobSpec(
        job_id="cancel-job",
        rows=[{"id": "long", "portrait": str(tmp_path / "face.png"), "audio": str(tmp_path / "speech.wav")}],
        output=str(tmp_path / "out"),
    )
    cancel = threading.Event()

    def on_event(event) -> None:  # the row is held at this block (segment 0 stored) until the cancel reaches it
        if is_block(event, "long", SEGMENT_BLOCKS - 1):
            cancel.set()

    held = workers_held_at("long", SEGMENT_BLOCKS - 1)
    report = run_job(spec, settings(), held, on_event=on_event, cancel=cancel)
    assert report.rows[0].status == "cancelled" and report.rows[0].error_kind == "cancelled"
    assert report.rows[0].error.startswith(f"cancelled after {SEGMENT_BLOCKS} blocks"), report.rows[0].error  # held
    assert not (tmp_path / "out" / "long.mp4").exists()
    (row_segments,) = (tmp_path / "out" / ".segments").iterdir()
    stored = sorted(path.name for path in row_segments.iterdir())
    mp4s = [name for name in stored if name.endswith(".mp4")]
    assert mp4s and [name for name in stored if name.endswith(".state")] == [mp4s[-1].replace(".mp4", ".state")]

    events = []
    report = run_job(spec.model_copy(update={"job_id": "cancel-job-2"}), settings(), WORKERS, on_event=events.append)
    assert report.rows[0].status == "succeeded" and report.rows[0].frames == 50
    (started,) = [e for e in events if isinstance(e, RowStarted)]
    assert started.resumed_from_block == SEGMENT_BLOCKS


def killed_and_reference_job(job_id: str, tmp_path) -> JobSpec:
    """Two rows of the same 2-s inputs: "killed" (the test interrupts it) and "reference" (rendered undisturbed)."""
    make_portrait(tmp_path / "face.png")
    make_audio(tmp_path / "speech.wav", 2.0)
    row = {"portrait": str(tmp_path / "face.png"), "audio": str(tmp_path / "speech.wav")}
    rows = [{"id": "killed", **row}, {"id": "reference", **row}]
    return JobSpec(job_id=job_id, rows=rows, output=str(tmp_path / "out"))


def kill_the_render_actor(job_id: str) -> str:
    """Kill the job's one render actor (Ray restarts it) and release the push it was held at; its id."""
    import ray

    from pipeline.job import progress_actor_name

    progress = ray.get_actor(progress_actor_name(job_id))
    ((actor_id, actor),) = ray.get(progress.get_render_actors.remote()).items()
    ray.kill(actor, no_restart=False)
    ray.get(progress.release.remote())
    return actor_id


def test_killed_render_actor_resumes_from_its_last_segment(ray_cluster, tmp_path):
    """Kill the render actor right after its first segment is stored; the row still completes, renders
    each finished segment once, and its frames equal those of an uninterrupted render of the same inputs."""
    spec = killed_and_reference_job("kill-job", tmp_path)
    events, killed = [], []

    def on_event(event) -> None:
        events.append(event)
        if not killed and is_block(event, "killed", SEGMENT_BLOCKS - 1):  # pushed after segment 0 was stored; held
            killed.append(kill_the_render_actor(spec.job_id))

    report = run_job(spec, settings(), workers_held_at("killed", SEGMENT_BLOCKS - 1), on_event=on_event)
    assert killed, "the render actor was never killed"
    assert report.counts == {"succeeded": 2}, report.rows
    # The dying worker kills its ffmpeg first, so the row may be reopened there before the restart: a reopen is
    # not an attempt.
    starts = [e for e in events if isinstance(e, RowStarted) and e.row_id == "killed" and not e.reopened]
    assert [s.resumed_from_block > 0 for s in starts] == [False, True], starts
    assert starts[1].resumed_from_block == SEGMENT_BLOCKS  # killed at the block it was held at
    blocks = {
        row_id: [e.block_index for e in events if isinstance(e, BlockRendered) and e.row_id == row_id]
        for row_id in ("killed", "reference")
    }
    total = len(blocks["reference"])
    assert sorted(set(blocks["killed"])) == list(range(total))
    # Finished segments are never rendered again: only blocks of the one unfinished segment repeat.
    repeated = [b for b in set(blocks["killed"]) if blocks["killed"].count(b) > 1]
    assert len(repeated) <= SEGMENT_BLOCKS, blocks["killed"]
    assert all(b >= starts[1].resumed_from_block for b in repeated), (repeated, starts[1])
    killed_frames, _ = read_video(tmp_path / "out" / "killed.mp4")
    reference_frames, _ = read_video(tmp_path / "out" / "reference.mp4")
    assert killed_frames.shape == reference_frames.shape == (50, 64, 64, 3)
    assert np.array_equal(killed_frames, reference_frames)  # identical on CPU: restore is bit-exact


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state, past the (command)


def _segment_encoders(row_index: int) -> list[int]:
    """Pids of the ffmpeg processes encoding segments of job row `row_index` (their output is in its segment dir)
    that descend from this test process (its Ray workers), none of anyone else's."""
    marker = f"avatar-segment-{row_index}-".encode()
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            ancestor = int(entry)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = _parent(ancestor)
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        is_ffmpeg = "ffmpeg" in os.path.basename(argv[0].decode(errors="replace"))
        if is_ffmpeg and ancestor == os.getpid() and any(marker in a for a in argv):
            pids.append(int(entry))
    return pids


def test_a_killed_segment_encoder_reopens_its_row_from_the_last_segment(ray_cluster, tmp_path):
    """SIGKILL the ffmpeg encoding one of a row's later segments (as the OOM killer would): the row is not failed
    for it but reopened in the same actor from its last stored segment, and its video equals an uninterrupted render."""
    import signal

    spec = killed_and_reference_job("encoder-kill", tmp_path)
    events, killed, finished = [], [], threading.Event()

    def kill_a_later_encoder() -> None:
        """Watch the files, not the events (they can arrive after the row is done): once a segment's state is
        stored, SIGKILL the first encoder of the row seen running (a later segment's)."""
        while not killed and not finished.is_set():
            if list((tmp_path / "out" / ".segments").glob("killed-*/*.state")):
                for pid in _segment_encoders(row_index=0)[:1]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_later_encoder, daemon=True)
    killer.start()
    try:
        report = run_job(spec, settings(), WORKERS, on_event=events.append)
    finally:
        finished.set()
        killer.join()
    assert len(killed) == 1, killed  # the killed row's one encoder
    assert report.counts == {"succeeded": 2}, report.rows
    starts = [e for e in events if isinstance(e, RowStarted) and e.row_id == "killed"]
    assert [s.reopened for s in starts] == [False, True] and starts[0].resumed_from_block == 0, starts
    assert starts[1].resumed_from_block > 0 and starts[1].resumed_from_block % SEGMENT_BLOCKS == 0, starts
    assert len({s.actor_id for s in starts}) == 1  # reopened where it was, no restart
    assert {row.id: row.render_attempts for row in report.rows} == {"killed": 1, "reference": 1}
    killed_frames, _ = read_video(tmp_path / "out" / "killed.mp4")
    reference_frames, _ = read_video(tmp_path / "out" / "reference.mp4")
    assert killed_frames.shape == reference_frames.shape
    assert np.array_equal(killed_frames, reference_frames)


def test_a_checkpoint_brings_its_own_preset(ray_cluster, tmp_path):
    """A checkpoint of another resolution, with the `preset` setting left at its default: the pipeline reads the
    checkpoint's preset (config.json only) and decodes the portrait at its size, so the row renders at it."""
    import shutil

    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.generator import AvatarModel
    from pipeline.job import model_preset

    preset = get_preset("tiny").with_resolution(32, 48)
    model = AvatarModel.random(preset, seed=1)
    checkpoint = save_checkpoint(tmp_path / "model", preset, {"dit": model.dit, "vae": model.vae})
    weightless = tmp_path / "config-only"
    weightless.mkdir()
    shutil.copy(checkpoint / "config.json", weightless)
    assert model_preset(settings(checkpoint=str(weightless))) == preset  # no weights read

    make_portrait(tmp_path / "face.png")
    make_audio(tmp_path / "speech.wav", 1.0)
    spec = JobSpec(
        job_id="own-preset",
        rows=[{"id": "small", "portrait": str(tmp_path / "face.png"), "audio": str(tmp_path / "speech.wav")}],
        output=str(tmp_path / "out"),
    )
    report = run_job(spec, settings(checkpoint=str(checkpoint)), WORKERS)
    assert report.counts == {"succeeded": 1}, report.rows
    frames, _ = read_video(tmp_path / "out" / "small.mp4")
    assert frames.shape == (25, 32, 48, 3)
    # The report's seams are where this model's blocks end (a latent per frame, 3 a block), not Wan2.1's 9 + 12.
    metrics = report.rows[0].metrics
    assert (metrics["first_block_frames"], metrics["block_frames"]) == (3, 3), metrics


def test_a_resume_reads_the_newer_state_when_another_attempt_deleted_the_one_it_listed(tmp_path):
    """Two attempts of one row can overlap (a retry while the first still runs): between a resume's listing and its
    read, the other attempt stores segment 2 and deletes state 1. The resume reads state 2, not a missing object."""
    import pytest

    from actors.render import MP4, STATE, last_stored_state, segment_uri

    prefix = str(tmp_path / "segments" / "row")

    class OverlappedStore(ObjectStore):
        """A real local store; the other attempt's writes happen right after the first listing."""

        listings = 0

        def list(self, prefix_: str) -> list[str]:
            found = super().list(prefix_)
            self.listings += 1
            if self.listings == 1:
                self.put_bytes(segment_uri(prefix, 2, MP4), b"segment 2")
                self.put_bytes(segment_uri(prefix, 2, STATE), b"state 2")
                self.delete(segment_uri(prefix, 1, STATE))
            return found

    store = OverlappedStore()
    for index in (0, 1):
        store.put_bytes(segment_uri(prefix, index, MP4), f"segment {index}".encode())
    store.put_bytes(segment_uri(prefix, 1, STATE), b"state 1")
    assert last_stored_state(store, prefix) == (2, b"state 2") and store.listings == 2
    assert last_stored_state(ObjectStore(), str(tmp_path / "segments" / "new-row")) is None

    class VanishingStore(ObjectStore):
        """Every state listed is gone by the time it is read."""

        def get_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
            self.delete(uri)
            return super().get_bytes(uri, max_bytes)

    store = VanishingStore()
    for index in range(5):
        store.put_bytes(segment_uri(prefix, index, STATE), b"state")
    with pytest.raises(RuntimeError, match="kept vanishing"):
        last_stored_state(store, prefix)

    class FinishedElsewhereStore(ObjectStore):
        """The other attempt finishes the row right after the listing: its writer removes all the segments."""

        def get_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
            self.delete_prefix(prefix)
            return super().get_bytes(uri, max_bytes)

    store = FinishedElsewhereStore()
    store.put_bytes(segment_uri(prefix, 0, STATE), b"state")
    with pytest.raises(RuntimeError, match="segments were removed while it resumed"):  # not a fresh start from block 0
        last_stored_state(store, prefix)
