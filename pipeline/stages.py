"""The task stages around the render actors: fetch-and-decode inputs before, nothing else here.

(The render UDF lives in actors/render.py, the writer in actors/writer.py.) Every stage is a plain
function of one row record; errors become the row's status, never an exception out of the dataset.
"""

from __future__ import annotations

import posixpath
import time

import ray

from model.config import Preset
from model.errors import InputError
from pipeline.events import RowStatus, StageTimed
from pipeline.records import RowRecord, array_to_bytes
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore


def fetch_row(row: dict, *, settings: PipelineSettings, preset: Preset, job_id: str, progress) -> dict:
    """Download and decode the row's portrait and audio for the model's `preset` (pipeline.job.model_preset: the
    checkpoint's own); a bad input fails the row (kind "input")."""
    record = RowRecord.from_row(row)
    if record.status != RowStatus.PENDING:
        return record.to_row()
    started = time.perf_counter()
    store = ObjectStore(settings.storage)
    task = record.task
    try:
        height = task.render.height or preset.video.height
        width = task.render.width or preset.video.width
        fit = preset.video.portrait_fit
        record.portrait = array_to_bytes(_decode(store, task.portrait, "portrait", height, width, fit))
        audio = _decode(store, task.audio, "audio", preset.audio.sample_rate)
        seconds = len(audio) / preset.audio.sample_rate
        if seconds > settings.limits.max_audio_seconds:
            raise InputError(
                task.audio, f"audio lasts {seconds:.0f} s, over the limit of {settings.limits.max_audio_seconds:.0f} s"
            )
        record.audio = array_to_bytes(audio)
    except InputError as err:
        record.fail("input", str(err))
    except Exception as err:  # storage or decoder trouble that is not the row's fault
        record.fail("fetch", f"{type(err).__name__}: {err}")
    record.timings["fetch"] = time.perf_counter() - started
    ray.get(progress.push.remote([StageTimed(job_id, "fetch", record.timings["fetch"])]))
    return record.to_row()


def _decode(store: ObjectStore, uri: str, kind: str, *args):
    """Decode one input through model.media; errors name the input's URI, not a temporary copy."""
    from model.media import load_audio, load_portrait

    load = load_portrait if kind == "portrait" else load_audio
    try:
        with store.local_copy(uri, suffix=posixpath.splitext(uri)[1]) as path:
            return load(path, *args)
    except FileNotFoundError:
        raise InputError(uri, f"{kind} file not found") from None
    except InputError as err:
        raise InputError(uri, err.problem) from None
