"""The job manager: accepts jobs, runs them with `pipeline.job.run_job` in background threads, tracks them.

State lives in the job store (sqlite); what only matters while a job runs (its cancel flag, the rows in
flight and their frames so far) lives here. Jobs outlive the service: on start, queued and running jobs are
queued again and run to the end; the pipeline skips rows already rendered and resumes rows from their last
stored segment, so nothing is rendered twice.

Submission checks a job completely and once: its options are validated into the job's settings, its model
is fixed (the service's checkpoint or preset written into the job's options, so a restart with another model
configured does not resume its rows with that one), its manifest is read (bounded) and every row validated
into the `RowTask`s the pipeline will run, each input URI normalised exactly as it will be read and confined
to the input roots; those tasks are what the store keeps (apart from the request, read only to run the job)
and what the job runs, so rewriting the manifest after the 202 changes nothing.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from deploy.metrics import ServiceMetrics
from deploy.schemas import JobRequest, JobStatus
from deploy.settings import ServiceSettings
from deploy.store import JobRecord, JobStore
from model.config import Preset
from pipeline.events import BlockRendered, Event, RowFinished, RowResult, RowStarted, RowStatus
from pipeline.job import JOB_OPTIONS, JobSpec, job_settings, model_preset, plan_tasks
from pipeline.manifest import RowTask, TooManyRows
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore, ObjectTooLarge
from pipeline.uri import confine, is_under, normalize_uri

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
MEDIA_COLUMNS = ("portrait", "audio", "truth_video")  # row columns naming files the service would read
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its tracebacks
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)(: .*)?$")  # "KeyError: 'x'"
MAX_ERROR_CHARS = 300  # a failed job's `error`: one line, this long at most (the log keeps the whole story)


class SubmitError(Exception):
    """A submission refused: the HTTP status, the offending field, and why."""

    def __init__(self, status: int, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.status, self.field, self.problem = status, field, problem


@dataclass
class _InFlight:
    """A running job's transient state."""

    cancel: threading.Event
    started: float
    rows_done_before: int  # rows finished by earlier attempts (for the ETA of this one)
    rows: dict[str, list] = field(default_factory=dict)  # row id -> [frames, video-seconds] so far


class JobManager:
    def __init__(self, settings: ServiceSettings, store: JobStore, metrics: ServiceMetrics, *, run_jobs: bool = True):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.run_jobs = run_jobs  # False: accept and track jobs but render nothing (API tests, no pipeline)
        self._queue: deque[str] = deque()
        self._wake = threading.Condition()
        self._lock = threading.Lock()  # guards _running
        self._submit_lock = threading.Lock()
        self._running: dict[str, _InFlight] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        metrics.watch_store(store.count_by_state, store.pending_rows)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue again every job that had not finished when the service last stopped, then start workers."""
        for job in self.store.unfinished():
            if job.cancel_requested:
                self.store.update(job.job_id, state="cancelled", finished=time.time())
                continue
            if job.state == "running":
                self.store.update(job.job_id, state="queued")
                log.info("job %s was running when the service stopped; queued again", job.job_id)
            self._queue.append(job.job_id)
        if not self.run_jobs:
            return
        self._stopping = False
        for i in range(self.settings.concurrent_jobs):
            thread = threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the workers. Running jobs are interrupted at their next block and stay queued in the store
        (not cancelled): the next start resumes them."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        with self._lock:
            for flight in self._running.values():
                flight.cancel.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    # -- requests -----------------------------------------------------------------------------------------

    def submit(self, request: JobRequest) -> JobRecord:
        limits = self.settings
        if (request.manifest is None) == (request.rows is None):
            raise SubmitError(422, "manifest", "give exactly one of 'manifest' (a URI) or 'rows' (inline rows)")
        if request.actors is not None and request.actors > limits.max_actors_per_job:
            raise SubmitError(422, "actors", f"{request.actors} actors; at most {limits.max_actors_per_job} per job")
        if request.rows is not None and len(request.rows) > limits.max_rows_per_job:
            raise SubmitError(429, "rows", f"{len(request.rows)} rows; at most {limits.max_rows_per_job} per job")

        job_id = f"job-{secrets.token_hex(6)}"
        manifest = None if request.manifest is None else self._confine_input("manifest", request.manifest)
        spec = JobSpec(
            job_id=job_id,
            manifest=manifest,
            rows=request.rows,
            output=self._output_for(job_id, request.output),
            actors=request.actors,
            force=request.force,
            options=self._checked_options(request.options),
        )
        tasks = self._checked_tasks(spec, checkpoint_from_job=request.options.get("checkpoint") is not None)
        record = JobRecord(
            job_id=job_id,
            request={
                "manifest": manifest,  # shown in the job's status; the job runs its tasks, never the file again
                "output": spec.output,
                "actors": spec.actors,
                "force": spec.force,
                "options": spec.options,
            },
            state="queued",
            created=time.time(),
            rows_total=len(tasks),
        )
        with self._submit_lock:  # count and add together, so concurrent submissions cannot pass the limits
            unfinished = self.store.count_by_state()
            if unfinished["queued"] + unfinished["running"] >= limits.max_pending_jobs:
                raise SubmitError(429, "job", f"{limits.max_pending_jobs} jobs are already pending; retry later")
            self._check_output_is_its_own(spec.output)
            self.store.add(record, tasks=[task.model_dump(mode="json") for task in tasks])
        self.metrics.jobs_submitted.inc()
        with self._wake:
            self._queue.append(job_id)
            self._wake.notify()
        return record

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job: a queued one at once; a running one stops its rows at the next block (they keep their
        segments) and ends 'cancelled'. A finished job is left as it is."""
        job = self.store.get(job_id)
        if job is None or job.state in TERMINAL_STATES:
            return job
        self.store.update(job_id, cancel_requested=1)
        with self._lock:
            flight = self._running.get(job_id)
            if flight:
                flight.cancel.set()
        if job.state == "queued" and flight is None:
            self.store.update(job_id, state="cancelled", finished=time.time())
        return self.store.get(job_id)

    def status(self, job_id: str) -> JobStatus | None:
        job = self.store.get(job_id)
        return self._status(job) if job else None

    def list(self, *, state: str | None = None, limit: int = 100, offset: int = 0) -> list[JobStatus]:
        return [self._status(job) for job in self.store.list(state=state, limit=limit, offset=offset)]

    def rows(self, job_id: str) -> list[RowResult] | None:
        if self.store.get(job_id) is None:
            return None
        finished = self.store.rows(job_id)
        done = {r.id for r in finished}
        with self._lock:
            flight = self._running.get(job_id)
            live = dict(flight.rows) if flight else {}
        running = [
            RowResult(id=row_id, status=RowStatus.RUNNING, frames=frames, video_seconds=seconds)
            for row_id, (frames, seconds) in live.items()
            if row_id not in done
        ]
        return finished + running

    # -- events -------------------------------------------------------------------------------------------

    def handle_event(self, job_id: str, event: Event) -> None:
        """The `on_event` of a running job: metrics, live progress, and every finished row into the store."""
        self.metrics.observe(event)
        if isinstance(event, RowStarted):
            with self._lock:
                flight = self._running.get(job_id)
                if flight is not None:
                    flight.rows.setdefault(event.row_id, [0, 0.0])
        elif isinstance(event, BlockRendered):
            with self._lock:
                flight = self._running.get(job_id)
                if flight is not None:
                    so_far = flight.rows.setdefault(event.row_id, [0, 0.0])
                    so_far[0] += event.frames
                    so_far[1] += event.video_seconds
        elif isinstance(event, RowFinished):
            self.store.put_row(job_id, event.row)
            with self._lock:
                flight = self._running.get(job_id)
                if flight is not None:
                    flight.rows.pop(event.row.id, None)

    # -- internals ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job_id = self._queue.popleft()
            try:
                self._run(job_id)
            except Exception:  # a bug here must not kill the worker; the job is marked failed in _run
                log.exception("job worker error on %s", job_id)

    def _run(self, job_id: str) -> None:
        flight = _InFlight(cancel=threading.Event(), started=time.time(), rows_done_before=0)
        with self._lock:  # registered before the store is read: a cancel() from now on reaches the flag
            self._running[job_id] = flight
        job = self.store.get(job_id)
        if self._stopping:  # stopped between taking the job and starting it: it stays queued
            with self._lock:
                self._running.pop(job_id, None)
            return
        if job is None or job.state != "queued" or job.cancel_requested:
            with self._lock:
                self._running.pop(job_id, None)
            if job is not None and job.state == "queued":
                self.store.update(job_id, state="cancelled", finished=time.time())
            return
        flight.rows_done_before = len(self.store.rows(job_id))
        self.store.update(job_id, state="running", started=flight.started, attempts=job.attempts + 1, error=None)
        state, error = "succeeded", None
        try:
            from actors import job_workers  # Ray: imported when a job first runs
            from pipeline.job import run_job

            spec = self._spec_to_run(job)
            report = run_job(
                spec,
                self.settings.pipeline,
                job_workers(),
                on_event=lambda e: self.handle_event(job_id, e),
                cancel=flight.cancel,
            )
            for row in report.rows:  # the events stored these already, but for a row the pipeline lost
                self.store.put_row(job_id, row)
            self.store.update(job_id, rows_total=max(len(report.rows), job.rows_total or 0))
        except Exception as err:
            log.exception("job %s failed", job_id)
            state, error = "failed", one_line_error(err)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        if flight.cancel.is_set():
            if self.store.get(job_id).cancel_requested:
                state = "cancelled"
            elif self._stopping:  # interrupted by a shutdown: the next start resumes it
                self.store.update(job_id, state="queued")
                return
        self.store.update(job_id, state=state, finished=time.time(), error=error)

    def _status(self, job: JobRecord) -> JobStatus:
        counts, frames, seconds = self.store.row_totals(job.job_id)
        finished_rows = sum(counts.values())
        with self._lock:
            flight = self._running.get(job.job_id)
            live = list(flight.rows.values()) if flight else []
            started, done_before = (flight.started, flight.rows_done_before) if flight else (None, 0)
        frames += sum(f for f, _ in live)
        seconds += sum(s for _, s in live)
        if live:
            counts[RowStatus.RUNNING.value] = len(live)
        progress = eta = None
        if job.rows_total:
            progress = min(1.0, finished_rows / job.rows_total)
            pending = job.rows_total - finished_rows - len(live)
            if pending > 0 and job.state in ("queued", "running"):
                counts[RowStatus.PENDING.value] = pending
            done_now = finished_rows - done_before
            if started is not None and done_now > 0:
                eta = (time.time() - started) / done_now * max(0, job.rows_total - finished_rows)
        if job.state == "succeeded":
            progress, eta = 1.0, 0.0
        return JobStatus(
            job_id=job.job_id,
            state=job.state,
            created=job.created,
            started=job.started,
            finished=job.finished,
            manifest=job.request.get("manifest"),
            output=job.request["output"],
            rows_total=job.rows_total,
            counts=counts,
            progress=progress,
            frames=frames,
            video_seconds=seconds,
            eta_seconds=eta,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            error=job.error,
        )

    def _spec_to_run(self, job: JobRecord) -> JobSpec:
        request = dict(job.request)
        tasks = self.store.tasks(job.job_id)
        if tasks is None:  # stored by a service before submissions kept their checked rows
            spec = JobSpec(job_id=job.job_id, **request)
            checked = self._checked_tasks(spec, checkpoint_from_job=spec.options.get("checkpoint") is not None)
            return spec.model_copy(update={"tasks": checked, "manifest": None, "rows": None})
        request.pop("manifest", None)
        return JobSpec(job_id=job.job_id, tasks=tasks, **request)

    def _checked_options(self, options: dict) -> dict:
        """Only known options; a checkpoint is an input, confined like the others and kept as what it resolves to
        (the values are validated with the job's settings, in _job_settings). Without one, the service's model is
        written in (its checkpoint, resolved; or none and its preset): the job runs with that model whatever the
        service is configured with when it resumes, since its rows' stored segments are that model's."""
        unknown = sorted(set(options) - JOB_OPTIONS)
        if unknown:
            raise SubmitError(422, f"options.{unknown[0]}", f"unknown job option; allowed: {sorted(JOB_OPTIONS)}")
        options = dict(options)
        if options.get("checkpoint") is not None:  # whether it holds a checkpoint: _model_preset reads its config
            uri = self._confine_input("options.checkpoint", options["checkpoint"])
            options["checkpoint"] = uri.removeprefix("file://")  # a local directory, or an s3:// prefix
        elif "checkpoint" not in options and self.settings.pipeline.checkpoint:
            try:
                options["checkpoint"] = normalize_uri(self.settings.pipeline.checkpoint).removeprefix("file://")
            except ValueError as err:
                raise SubmitError(422, "options.checkpoint", f"the service's checkpoint: {err}") from None
        else:
            options["checkpoint"] = None  # not the one a later configuration names
            options.setdefault("preset", self.settings.pipeline.preset)
        return options

    def _checked_tasks(self, spec: JobSpec, *, checkpoint_from_job: bool) -> list[RowTask]:
        """The rows the job will run: read, validated and confined, or a SubmitError. A checkpoint the job named
        is read confined to the input roots (the service's own, from its settings, is the operator's)."""
        settings = self._job_settings(spec)
        field_prefix = "rows" if spec.rows is not None else "manifest.rows"
        roots = self.settings.input_roots if checkpoint_from_job else None
        try:
            preset = self._model_preset(settings, roots)
            store = ObjectStore(settings.storage)
            tasks = plan_tasks(spec, settings, preset, store, max_rows=self.settings.max_rows_per_job)
        except TooManyRows as err:
            raise SubmitError(429, "manifest", str(err)) from None
        except ObjectTooLarge as err:
            raise SubmitError(413, "manifest", str(err)) from None
        except (OSError, ValueError, BotoCoreError, ClientError) as err:  # storage refused or failed: not a 5xx
            raise SubmitError(422, "manifest", f"cannot read the manifest: {err}") from None
        if self.settings.input_roots:
            for task in tasks:
                for column in MEDIA_COLUMNS:
                    uri = getattr(task, column)
                    if uri:  # exactly what the pipeline will read
                        self._confine_input(f"{field_prefix}.{task.index}.{column}", uri)
        return tasks

    def _model_preset(self, settings: PipelineSettings, roots: list[str] | None) -> Preset:
        """The preset the job's rows are validated for: its checkpoint's own (read from config.json)."""
        try:
            return model_preset(settings, roots or None)
        except Exception as err:  # not a checkpoint's config, or a model without its encoders: found now
            if settings.checkpoint:
                raise SubmitError(422, "options.checkpoint", f"cannot use the checkpoint: {err}") from None
            raise SubmitError(422, "options.preset", f"cannot use the preset: {err}") from None

    def _job_settings(self, spec: JobSpec) -> PipelineSettings:
        """The settings the job will run with: a bad option value is a 422 now, not a failed job later."""
        try:
            return job_settings(spec, self.settings.pipeline)
        except ValidationError as err:
            first = err.errors()[0]
            name = "actors" if first["loc"][:1] == ("num_actors",) else ".".join(map(str, ("options", *first["loc"])))
            raise SubmitError(422, name, first["msg"].removeprefix("Value error, ")) from None

    def _confine_input(self, field_name: str, uri: str) -> str:
        try:
            if self.settings.input_roots:
                return confine(uri, self.settings.input_roots)
            return normalize_uri(uri)
        except ValueError as err:
            raise SubmitError(422, field_name, str(err)) from None

    def _output_for(self, job_id: str, requested: str | None) -> str:
        roots = [normalize_uri(root) for root in self.settings.effective_output_roots()]
        if requested is None:
            return roots[0].rstrip("/") + "/" + job_id
        try:
            output = confine(requested, roots)
        except ValueError as err:
            raise SubmitError(422, "output", str(err)) from None
        if output in roots:
            raise SubmitError(422, "output", f"{requested!r} is an output root itself; name a folder under it")
        return output

    def _check_output_is_its_own(self, output: str) -> None:
        """A job's output may not lie inside another job's output or contain one (their videos, reports and
        segments would mix); the same output as a finished job is a re-run (rows already there are skipped),
        as an unfinished one a conflict."""
        for other in self.store.outputs():
            if other.output == output:
                if other.state in ("queued", "running"):
                    raise SubmitError(409, "output", f"job {other.job_id} is already writing to {output}")
            elif is_under(output, other.output) or is_under(other.output, output):
                raise SubmitError(409, "output", f"{output} and the output of job {other.job_id} lie inside each other")


def one_line_error(err: BaseException) -> str:
    """A failed job's error for its status: one line naming the root cause, without Ray's traceback (internal
    paths, node addresses), at most MAX_ERROR_CHARS. The whole story stays in the service's log."""
    while isinstance(getattr(err, "cause", None), BaseException):  # RayTaskError wraps the task's exception
        err = err.cause
    lines = [line for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    if type(err).__module__.startswith("ray.") and len(lines) > 1:
        # A Ray error that carries a traceback as text: its last exception line is the one that matters.
        raised = [line.strip() for line in lines if _EXCEPTION_LINE.match(line)]
        context = "a render actor failed to start" if getattr(err, "_actor_init_failed", False) else type(err).__name__
        message = f"{context}: {raised[-1]}" if raised else f"{type(err).__name__}: {lines[0].strip()}"
    else:
        message = f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."
