"""The writer stage: one Ray task per row that stitches its segments and uploads the final mp4.

Segments are concatenated without re-encoding the video, the row's original audio is muxed as AAC, and
the result is uploaded through the object store (atomic: the output appears only when complete). The
segments are deleted only after the upload. Every row that enters the pipeline leaves this stage with a
RowFinished event (rows failed by validation or skipped are closed by the driver before the pipeline).
"""

from __future__ import annotations

import os
import tempfile
import time

import ray

from actors.render import MP4
from model.errors import InputError
from pipeline.events import RowFinished, RowStatus, StageTimed
from pipeline.records import RowRecord
from pipeline.settings import PipelineSettings
from pipeline.stages import input_copy
from pipeline.storage import ObjectStore


def write_row(row: dict, *, settings: PipelineSettings, job_id: str, progress) -> dict:
    record = RowRecord.from_row(row)
    events = []
    if record.status == RowStatus.RENDERED:
        started = time.perf_counter()
        try:
            _stitch_and_upload(record, ObjectStore(settings.storage), settings)
            record.status = RowStatus.SUCCEEDED
        except Exception as err:
            record.fail("write", f"{type(err).__name__}: {err}")
        record.timings["write"] = time.perf_counter() - started
        events.append(StageTimed(job_id, "write", record.timings["write"]))
    record.result["render_attempts"] = ray.get(progress.render_attempts.remote(record.task.id))
    events.append(RowFinished(job_id, record.to_result()))  # metrics, timings, duration and attempts included
    ray.get(progress.push.remote(events))
    return record.to_row()


def _quality_metrics(video: str, portrait: str, audio: str, layout: dict) -> dict:
    """The report's per-row quality numbers, seams where the model's blocks end (`layout`, from the render); a
    metric that cannot be computed is reported, not fatal."""
    from model.eval import evaluate

    try:
        scores = evaluate(video, portrait, audio, **layout)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    keys = ("lipsync_r", "lipsync_reference", "av_offset_frames", "identity_error", "portrait_psnr", "boundary_jitter")
    keys += ("block_frames", "first_block_frames")  # where boundary_jitter looked for seams
    return {k: scores[k] for k in keys if k in scores}


def _truth_video_metrics(store: ObjectStore, uri: str, video: str, portrait: str, settings: PipelineSettings) -> dict:
    """The PSNR against the row's truth video, the still portrait's beside it; a truth that cannot be read or compared
    costs these numbers, not the row's others."""
    from model.eval.evaluate import score_truth_video

    try:
        with input_copy(store, uri, "truth video", settings.limits) as truth:
            try:
                return score_truth_video(video, truth, portrait, settings.limits.max_portrait_pixels)
            except InputError as err:
                if err.source not in (truth, os.path.realpath(truth)):
                    raise  # the render's or the portrait's
                raise InputError(uri, err.problem) from None  # named by its URI, not the local copy
    except Exception as err:
        return {"truth_video_error": f"{type(err).__name__}: {err}"}


def _stitch_and_upload(record: RowRecord, store: ObjectStore, settings: PipelineSettings) -> None:
    from model.media import concat_mp4

    task, result = record.task, record.result
    segments = [u for u in store.list(task.segments) if u.endswith(MP4)]
    if len(segments) != result["segments"]:
        raise RuntimeError(f"expected {result['segments']} segments under {task.segments}, found {len(segments)}")
    with tempfile.TemporaryDirectory(prefix="avatar-write-") as tmp:
        local = []
        for i, uri in enumerate(segments):
            local.append(os.path.join(tmp, f"{i:06d}{MP4}"))
            store.get_file(uri, local[-1])
        out = os.path.join(tmp, "out" + MP4)
        with input_copy(store, task.audio, "audio", settings.limits) as audio:
            concat_mp4(local, out, audio_path=audio)  # the audio opened as in fetch: local file, allowed formats
            if 0 < result["video_seconds"] <= settings.metrics_max_seconds:
                with input_copy(store, task.portrait, "portrait", settings.limits) as portrait:
                    result["metrics"] = _quality_metrics(out, portrait, audio, result["block_layout"])
                    if task.truth_video and "error" not in result["metrics"]:
                        truth = _truth_video_metrics(store, task.truth_video, out, portrait, settings)
                        result["metrics"] |= truth
        store.put_file(task.output, out)
    store.delete_prefix(task.segments)
