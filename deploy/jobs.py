"""The job manager: accepts jobs, runs them with `pipeline.job.run_job` in background threads, tracks them.

State lives in the job store (sqlite); what only matters while a job runs (its cancel flag, the rows in
flight and their frames so far) lives here. Jobs outlive the service: on start, queued and running jobs are
queued again and run to the end; the pipeline skips rows already rendered and resumes rows from their last
stored segment, so nothing is rendered twice.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from deploy.confine import confine, normalize_uri
from deploy.metrics import ServiceMetrics
from deploy.schemas import JobRequest, JobStatus
from deploy.settings import ServiceSettings
from deploy.store import JobRecord, JobStore
from pipeline.events import BlockRendered, Event, RowFinished, RowResult, RowStarted, RowStatus
from pipeline.job import JOB_OPTIONS
from pipeline.manifest import manifest_dir, read_manifest
from pipeline.storage import ObjectStore
from pipeline.storage import normalize_uri as pipeline_uri

log = logging.getLogger(__name__)

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
MEDIA_COLUMNS = ("portrait", "audio")  # row columns naming files the service would read


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
        unknown = sorted(set(request.options) - JOB_OPTIONS)
        if unknown:
            raise SubmitError(422, f"options.{unknown[0]}", f"unknown job option; allowed: {sorted(JOB_OPTIONS)}")
        rows_total = None
        manifest = None
        if request.rows is not None:
            if len(request.rows) > limits.max_rows_per_job:
                raise SubmitError(429, "rows", f"{len(request.rows)} rows; at most {limits.max_rows_per_job} per job")
            self._check_row_inputs(request.rows)
            rows_total = len(request.rows)
        else:
            manifest = self._confine_input("manifest", request.manifest)
            rows = self._read_manifest(manifest)
            if len(rows) > limits.max_rows_per_job:
                raise SubmitError(429, "manifest", f"{len(rows)} rows; at most {limits.max_rows_per_job} per job")
            self._check_row_inputs(
                [row for row in rows if isinstance(row, dict)],
                base=manifest_dir(manifest),
                field_prefix="manifest.rows",
            )
            rows_total = len(rows)

        job_id = f"job-{secrets.token_hex(6)}"
        record = JobRecord(
            job_id=job_id,
            request={
                "manifest": manifest,
                "rows": request.rows,
                "output": self._output_for(job_id, request.output),
                "actors": request.actors,
                "force": request.force,
                "options": request.options,
            },
            state="queued",
            created=time.time(),
            rows_total=rows_total,
        )
        with self._submit_lock:  # count and add together, so concurrent submissions cannot pass the limit
            unfinished = self.store.count_by_state()
            if unfinished["queued"] + unfinished["running"] >= limits.max_pending_jobs:
                raise SubmitError(429, "job", f"{limits.max_pending_jobs} jobs are already pending; retry later")
            self.store.add(record)
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
            from pipeline.job import JobSpec, run_job

            spec = JobSpec(job_id=job_id, **job.request)
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
            state, error = "failed", f"{type(err).__name__}: {err}"
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

    def _confine_input(self, field_name: str, uri: str) -> str:
        try:
            if self.settings.input_roots:
                return confine(uri, self.settings.input_roots)
            return normalize_uri(uri)
        except ValueError as err:
            raise SubmitError(422, field_name, str(err)) from None

    def _read_manifest(self, uri: str) -> list:
        """The manifest's raw rows, read now to count them and to fail an unreadable manifest at once."""
        try:
            return read_manifest(uri, ObjectStore(self.settings.pipeline.storage))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise SubmitError(422, "manifest", f"cannot read the manifest: {err}") from None

    def _check_row_inputs(self, rows: list[dict], *, base: str | None = None, field_prefix: str = "rows") -> None:
        """With input roots set, every media URI a row names must lie under one (the pipeline validates the
        rest of each row, and a bad row fails alone)."""
        if not self.settings.input_roots:
            return
        for i, row in enumerate(rows):
            for column in MEDIA_COLUMNS:
                value = row.get(column)
                if isinstance(value, str) and value:
                    field_name = f"{field_prefix}.{i}.{column}"
                    try:
                        uri = pipeline_uri(value, base)
                    except ValueError as err:
                        raise SubmitError(422, field_name, str(err)) from None
                    self._confine_input(field_name, uri)

    def _output_for(self, job_id: str, requested: str | None) -> str:
        roots = self.settings.effective_output_roots()
        if requested is None:
            return normalize_uri(roots[0]).rstrip("/") + "/" + job_id
        try:
            return confine(requested, roots)
        except ValueError as err:
            raise SubmitError(422, "output", str(err)) from None
