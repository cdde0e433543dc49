"""Run one job: manifest rows -> validate -> fetch -> render actors -> writers -> report.

    from actors import job_workers
    report = run_job(JobSpec(job_id="j1", manifest="jobs/a.jsonl", output="s3://bucket/out"), settings, job_workers())

The stages run on Ray Data; the driver thread polls the job's progress actor, hands every event to
`on_event` in order, and forwards `cancel`. A bad row becomes a failed row of the report, never an
exception; only a job that cannot start (unreadable manifest, bad options) raises.

The Ray workers (progress actor, render actor, writer) live in actors/, one layer up: they are built on this
layer's records, so this module never imports them; the caller hands them in as `JobWorkers`.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from model.config import Preset
from pipeline.events import Event, RowFinished, RowResult, RowStatus, StageTimed
from pipeline.manifest import RowTask, manifest_dir, read_manifest, validate_rows
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore
from pipeline.uri import confine, is_under, normalize_uri

POLL_SECONDS = 0.2  # how often the driver reads new events
EXISTS_CHECKS_IN_FLIGHT = 16  # concurrent existence checks of outputs (S3 HEAD requests)
JOB_OPTIONS = frozenset({"segment_blocks", "preset", "checkpoint", "rows_per_actor"})  # settings a job may override


@dataclass(frozen=True)
class JobWorkers:
    """The Ray workers a job runs on (actors.job_workers() builds them)."""

    progress_actor: Any  # a @ray.remote class: (job_id), with push, events_since, cancel, render_attempts
    render_actor: type  # a Ray Data callable class: (settings, job_id, progress), then batch -> batch
    write_row: Callable[..., dict]  # a Ray Data map function: (row, *, settings, job_id, progress) -> row


def progress_actor_name(job_id: str) -> str:
    """The job's progress actor is named, so that a rerun with the same id finds a leftover and operators (and the
    resume test) find the render actors registered with it."""
    return f"avatar-render-progress-{job_id}"


class JobSpec(BaseModel):
    job_id: str
    manifest: str | None = None  # URI of a JSONL/CSV/Parquet manifest ...
    rows: list[dict] | None = None  # ... or the rows inline (relative paths resolve against the cwd) ...
    tasks: list[RowTask] | None = None  # ... or rows `plan_tasks` validated (and a service checked): run as given
    output: str  # output root URI: videos, report.parquet, report.jsonl, .segments/
    actors: int | None = None  # render actors; None: settings.num_actors
    force: bool = False  # re-render rows whose output exists
    options: dict = Field(default_factory=dict)  # per-job overrides of JOB_OPTIONS settings


class JobReport(BaseModel):
    job_id: str
    rows: list[RowResult]
    counts: dict[str, int]  # rows by status (RowStatus values)
    started: datetime
    finished: datetime


def run_job(
    spec: JobSpec,
    settings: PipelineSettings,
    workers: JobWorkers,
    *,
    on_event: Callable[[Event], None] | None = None,
    cancel: threading.Event | None = None,
) -> JobReport:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = datetime.now(UTC)
    settings = job_settings(spec, settings)
    preset = model_preset(settings)
    store = ObjectStore(settings.storage)
    output_root = normalize_uri(spec.output).rstrip("/")

    tick = time.perf_counter()
    tasks = spec.tasks if spec.tasks is not None else plan_tasks(spec, settings, preset, store)
    validate_seconds = time.perf_counter() - tick

    _connect_ray(settings)
    name = progress_actor_name(spec.job_id)
    try:
        ray.kill(ray.get_actor(name))  # left over from a crashed run with the same id
    except ValueError:
        pass
    # On the driver's node: a lost worker node must not take the job's event log and cancel flag with it
    # (and if the driver's node goes, the job is lost anyway).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = workers.progress_actor.options(name=name, scheduling_strategy=here).remote(spec.job_id)
    ray.get(progress.push.remote([StageTimed(spec.job_id, "validate", validate_seconds)]))
    try:
        records = _execute(tasks, spec, settings, preset, workers, progress, on_event or (lambda event: None), cancel)
    finally:
        ray.kill(progress)

    tick = time.perf_counter()
    rows = [record.to_result() for record in records]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status.value] = counts.get(row.status.value, 0) + 1
    report = JobReport(job_id=spec.job_id, rows=rows, counts=counts, started=started, finished=datetime.now(UTC))
    write_report(report, output_root, store)
    if on_event is not None:
        on_event(StageTimed(spec.job_id, "report", time.perf_counter() - tick))
    return report


def job_settings(spec: JobSpec, settings: PipelineSettings) -> PipelineSettings:
    """`settings` with the job's options and actor count; pydantic ValidationError for a bad value."""
    unknown = set(spec.options) - JOB_OPTIONS
    if unknown:
        raise ValueError(f"unknown job option(s) {sorted(unknown)}; allowed: {sorted(JOB_OPTIONS)}")
    update: dict[str, Any] = dict(spec.options)
    if spec.actors is not None:
        update["num_actors"] = spec.actors
    # Re-validate so that overrides obey the same constraints as settings from the environment.
    return type(settings).model_validate({**settings.model_dump(), **update}) if update else settings


def model_preset(settings: PipelineSettings, roots: list[str] | None = None) -> Preset:
    """The preset of the model the render actors load (the choice AvatarModel.load makes): a checkpoint's own,
    read from its config.json without the weights; with no checkpoint, the bundled model's for `tiny`, else the
    named preset's (a seeded random model). Rows are validated and their inputs decoded for this preset.

    A checkpoint's config.json is read like any input: through the store, bounded (MAX_CONFIG_BYTES), a FIFO or a
    device refused, inside the checkpoint (a symbolic link out of it is refused) and, with `roots`, inside them."""
    from model.checkpoint import MAX_CONFIG_BYTES, preset_from_config, read_preset, require_components
    from model.config import get_preset
    from model.errors import ModelComponentError
    from model.generator import BUNDLED_MODEL

    if settings.checkpoint:
        uri = checkpoint_config_uri(settings.checkpoint, roots)
        try:
            preset = preset_from_config(ObjectStore(settings.storage).get_bytes(uri, max_bytes=MAX_CONFIG_BYTES), uri)
        except FileNotFoundError as err:
            raise ModelComponentError(
                f"{err}; the checkpoint must be a directory that training or `avatar-render import` wrote"
            ) from None
        if not uri.startswith("s3://"):
            require_components(settings.checkpoint, preset)  # fail the job now, not in every actor
        return preset
    if settings.preset == "tiny" and (BUNDLED_MODEL / "config.json").exists():
        return read_preset(BUNDLED_MODEL)
    preset = get_preset(settings.preset)
    require_components(None, preset)
    return preset


def checkpoint_config_uri(checkpoint: str, roots: list[str] | None = None) -> str:
    """The URI of a checkpoint's config.json as it will be read: inside the checkpoint directory and, with `roots`,
    inside one of them; ValueError otherwise."""
    from model.checkpoint import CONFIG_FILE

    directory = normalize_uri(checkpoint)
    uri = normalize_uri(f"{directory.rstrip('/')}/{CONFIG_FILE}")
    if not is_under(uri, directory):
        raise ValueError(f"{checkpoint}: its {CONFIG_FILE} leads out of the checkpoint directory (a symbolic link)")
    return confine(uri, roots) if roots else uri


def plan_tasks(
    spec: JobSpec, settings: PipelineSettings, preset: Preset, store: ObjectStore, *, max_rows: int | None = None
) -> list[RowTask]:
    """The job's rows read (bounded by `max_rows` and the manifest size limit) and validated for the model's
    `preset`: every URI normalised as it will be read. `settings` are the job's own (`job_settings`)."""
    if (spec.manifest is None) == (spec.rows is None):
        raise ValueError("a job needs exactly one of `manifest` and `rows`")
    if spec.manifest is not None:
        raw = read_manifest(spec.manifest, store, max_rows=max_rows, max_bytes=settings.limits.max_manifest_bytes)
        base = manifest_dir(spec.manifest)
    else:
        raw, base = list(spec.rows), normalize_uri(os.getcwd())
    return validate_rows(
        raw,
        output_root=normalize_uri(spec.output).rstrip("/"),
        base_uri=base,
        limits=settings.limits,
        preset=preset,
        model_key=f"{preset.name}:{settings.checkpoint}",
    )


def _connect_ray(settings: PipelineSettings) -> None:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=settings.ray_address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows its own progress (rows, video-seconds)


def _execute(tasks, spec, settings, preset, workers, progress, on_event, cancel) -> list:
    """Run the Ray Data stages in a worker thread; relay events and cancellation from this thread."""
    import ray
    import ray.data

    from pipeline.records import RowRecord, initial_record
    from pipeline.stages import fetch_row

    records = [initial_record(task) for task in tasks]
    _skip_finished(records, ObjectStore(settings.storage), spec.force)
    # Rows already decided (invalid, skipped) never enter the dataset: the driver closes them here.
    pending = RowStatus.PENDING
    ray.get(progress.push.remote([RowFinished(spec.job_id, r.to_result()) for r in records if r.status != pending]))
    rows = [r.to_row() for r in records if r.status == pending]
    if not rows:
        _relay_events(progress, on_event)
        return records
    stage_args = {"settings": settings, "job_id": spec.job_id, "progress": progress}
    use_gpu = settings.device == "cuda"
    actor_cpus = settings.actor_num_cpus
    if not use_gpu:
        # CPU actors hold their CPUs for the whole job: leave room for one fetch/write task, or they starve.
        cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
        actor_cpus = min(
            actor_cpus, max(settings.io_num_cpus, (cluster_cpus - settings.io_num_cpus) / settings.num_actors)
        )
    dataset = (
        ray.data.from_items(rows, override_num_blocks=len(rows))  # one block per row: rows stream independently
        .map(fetch_row, fn_kwargs={**stage_args, "preset": preset}, num_cpus=settings.io_num_cpus)
        .map_batches(
            workers.render_actor,
            batch_size=1,
            batch_format="pyarrow",
            fn_constructor_kwargs=stage_args,
            # A fixed pool; each actor keeps up to rows_per_actor rows in flight in its one engine (its __call__ is
            # async: concurrent calls feed one engine loop, refilled as rows finish). Ray Data gives pool actors
            # max_restarts=-1 and max_task_retries=-1 by default: a killed actor comes back (model reloaded) and its
            # rows are retried there, resuming from their stored segments.
            compute=ray.data.ActorPoolStrategy(
                size=settings.num_actors,
                max_tasks_in_flight_per_actor=settings.rows_per_actor,
                max_concurrent_calls_per_actor=settings.rows_per_actor,
            ),
            num_cpus=actor_cpus,
            num_gpus=1 if use_gpu else 0,
        )
        .map(workers.write_row, fn_kwargs=stage_args, num_cpus=settings.io_num_cpus)
    )

    outcome: dict[str, Any] = {}

    def consume() -> None:
        try:
            outcome["rows"] = dataset.take_all()
        except BaseException as err:  # re-raised in the driver thread
            outcome["error"] = err

    worker = threading.Thread(target=consume, name=f"job-{spec.job_id}", daemon=True)
    worker.start()
    cursor, cancel_sent = 0, False
    while True:
        alive = worker.is_alive()
        if cancel is not None and cancel.is_set() and not cancel_sent:
            ray.get(progress.cancel.remote())
            cancel_sent = True
        cursor = _relay_events(progress, on_event, cursor)
        if not alive:
            break
        worker.join(POLL_SECONDS)
    if "error" in outcome:
        raise outcome["error"]
    done = {record.task.index: record for record in map(RowRecord.from_row, outcome["rows"])}
    records = [done.get(record.task.index, record) for record in records]
    for record in records:
        if record.status == RowStatus.PENDING:  # cannot happen unless Ray Data dropped a row; never report it
            record.fail("internal", "the pipeline returned no result for this row")
    return records


def _skip_finished(records: list, store: ObjectStore, force: bool) -> None:
    """Idempotency: a pending row whose output exists is skipped, unless forced (outputs appear atomically,
    so an existing output is a complete one)."""
    pending = [r for r in records if r.status == RowStatus.PENDING]
    if force or not pending:
        return
    with ThreadPoolExecutor(max_workers=EXISTS_CHECKS_IN_FLIGHT) as pool:
        for record, exists in zip(pending, pool.map(lambda r: store.exists(r.task.output), pending)):
            if exists:
                record.status = RowStatus.SKIPPED


def _relay_events(progress, on_event, cursor: int = 0) -> int:
    """Hand every event after `cursor` to on_event, in order; returns the new cursor."""
    import ray

    events, cursor = ray.get(progress.events_since.remote(cursor))
    for event in events:
        on_event(event)
    return cursor


REPORT_COLUMNS = (
    "id",
    "status",
    "output",
    "error",
    "error_kind",
    "frames",
    "video_seconds",
    "duration_s",
    "rows_in_batch",
    "render_attempts",
    "resumed_from_segment",
)


def write_report(report: JobReport, output_root: str, store: ObjectStore) -> None:
    """report.jsonl (one JSON object per row) and report.parquet (timings/metrics as JSON text columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row.model_dump(mode="json") for row in report.rows]
    lines = [json.dumps({"job_id": report.job_id, **row}) for row in rows]
    store.put_bytes(f"{output_root}/report.jsonl", ("\n".join(lines) + "\n").encode() if lines else b"")
    columns = {c: [row[c] for row in rows] for c in REPORT_COLUMNS}
    columns["timings"] = [json.dumps(row["timings"]) for row in rows]
    columns["metrics"] = [json.dumps(row["metrics"]) for row in rows]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("status", pa.string()),
            ("output", pa.string()),
            ("error", pa.string()),
            ("error_kind", pa.string()),
            ("frames", pa.int64()),
            ("video_seconds", pa.float64()),
            ("duration_s", pa.float64()),
            ("rows_in_batch", pa.int64()),
            ("render_attempts", pa.int64()),
            ("resumed_from_segment", pa.int64()),
            ("timings", pa.string()),
            ("metrics", pa.string()),
        ]
    )
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), buffer)
    store.put_bytes(f"{output_root}/report.parquet", buffer.getvalue())
