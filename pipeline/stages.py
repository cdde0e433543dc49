"""The task stages around the render actors: fetch-and-decode inputs before, nothing else here.

(The render UDF lives in actors/render.py, the writer in actors/writer.py.) Every stage is a plain
function of one row record; errors become the row's status, never an exception out of the dataset.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections.abc import Iterator

import ray

from model.config import Preset
from model.errors import InputError
from pipeline.events import RowStatus, StageTimed
from pipeline.records import RowRecord, array_to_bytes
from pipeline.settings import LimitSettings, PipelineSettings
from pipeline.storage import ObjectStore, ObjectTooLarge
from pipeline.uri import normalize_uri


def fetch_row(row: dict, *, settings: PipelineSettings, preset: Preset, job_id: str, progress) -> dict:
    """Download and decode the row's portrait and audio for the model's `preset` (pipeline.job.model_preset: the
    checkpoint's own); a bad input fails the row (kind "input")."""
    from model.media import load_audio, load_portrait

    record = RowRecord.from_row(row)
    if record.status != RowStatus.PENDING:
        return record.to_row()
    started = time.perf_counter()
    store = ObjectStore(settings.storage)
    task, limits = record.task, settings.limits
    try:
        height = task.render.height or preset.video.height
        width = task.render.width or preset.video.width
        with input_copy(store, task.portrait, "portrait", limits) as path:
            portrait = _decoded(
                task.portrait,
                load_portrait,
                path,
                height,
                width,
                preset.video.portrait_fit,
                limits.max_portrait_pixels,
                limits.min_portrait_side,
            )
        record.portrait = array_to_bytes(portrait)
        with input_copy(store, task.audio, "audio", limits) as path:
            audio = _decoded(task.audio, load_audio, path, preset.audio.sample_rate, limits.max_audio_seconds)
        record.audio = array_to_bytes(audio)
    except InputError as err:
        record.fail("input", str(err))
    except Exception as err:  # storage or decoder trouble that is not the row's fault
        record.fail("fetch", f"{type(err).__name__}: {err}")
    record.timings["fetch"] = time.perf_counter() - started
    ray.get(progress.push.remote([StageTimed(job_id, "fetch", record.timings["fetch"])]))
    return record.to_row()


@contextlib.contextmanager
def input_copy(store: ObjectStore, uri: str, kind: str, limits: LimitSettings) -> Iterator[str]:
    """A local path holding a row's input, read exactly as it was checked: a URI that no longer normalises
    to itself (a symbolic link changed since validation) and an object over `max_input_bytes` are input
    errors, raised before anything is downloaded. Errors name the URI, never a temporary copy."""
    if normalize_uri(uri) != uri:
        raise InputError(uri, f"{kind} path now leads elsewhere (a symbolic link changed after it was checked)")
    try:
        with store.local_copy(uri, suffix=posixpath.splitext(uri)[1], max_bytes=limits.max_input_bytes) as path:
            yield path
    except ObjectTooLarge:
        raise InputError(uri, f"{kind} file is over the limit of {limits.max_input_bytes} bytes") from None
    except FileNotFoundError as err:
        problem = str(err).removeprefix(f"{uri}: ")
        missing = problem in ("file not found", "no such object")
        raise InputError(uri, f"{kind} file not found" if missing else f"{kind}: {problem}") from None


def _decoded(uri: str, load, path: str, *args):
    """Decode through model.media; its errors name the input's URI, not a local copy."""
    try:
        return load(path, *args)
    except InputError as err:
        raise InputError(uri, err.problem) from None
