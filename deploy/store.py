"""The persistent job store: one sqlite file in the service's state dir.

Jobs outlive the service: a job's request, state and every finished row are written here as they happen, so a
restarted service lists the same jobs and re-queues the ones that had not finished. A job's checked rows (its
tasks, up to thousands) live in a table of their own, read only when the job runs: status and list reads parse
the small request alone. One store owns a state dir
at a time: it holds an exclusive lock on `<state_dir>/service.lock` while open, and a second store (a second
service on the same directory) refuses to open (StateDirLocked) instead of running the same jobs twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from pipeline.events import RowResult, RowStatus

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UNFINISHED_STATES: tuple[JobState, ...] = ("queued", "running")
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT UNIQUE NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    rows_total INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    output TEXT
);
CREATE TABLE IF NOT EXISTS rows (
    job_id TEXT NOT NULL,
    row_id TEXT NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    error_kind TEXT,
    frames INTEGER NOT NULL DEFAULT 0,
    video_seconds REAL NOT NULL DEFAULT 0,
    duration_s REAL,
    timings TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    render_attempts INTEGER NOT NULL DEFAULT 0,
    resumed_from_segment INTEGER,
    rows_in_batch INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, row_id)
);
CREATE TABLE IF NOT EXISTS job_tasks (
    job_id TEXT PRIMARY KEY,
    tasks TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
"""


class StateDirLocked(RuntimeError):
    """Another open store (another service) owns this state dir."""


class JobOutput(BaseModel):
    job_id: str
    output: str
    state: JobState


class JobRecord(BaseModel):
    job_id: str
    request: dict  # the accepted submission, confined URIs and the model filled in (its tasks: JobStore.tasks)
    state: JobState
    created: float
    started: float | None = None
    finished: float | None = None
    rows_total: int | None = None  # known for inline rows and read manifests
    cancel_requested: bool = False
    attempts: int = 0  # how many times a worker began it (more than 1 after a restart)
    error: str | None = None


_JOB_COLUMNS = "job_id, request, state, created, started, finished, rows_total, cancel_requested, attempts, error"


def _job_from_row(row: tuple) -> JobRecord:
    job_id, request, state, created, started, finished, rows_total, cancel_requested, attempts, error = row
    return JobRecord(
        job_id=job_id,
        request=json.loads(request),
        state=state,
        created=created,
        started=started,
        finished=finished,
        rows_total=rows_total,
        cancel_requested=bool(cancel_requested),
        attempts=attempts,
        error=error,
    )


class JobStore:
    """Thread-safe: one connection, one lock (sqlite serialises writers anyway)."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self._owner = _lock_state_dir(state_dir)
        self.path = state_dir / "jobs.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        if self._add_missing_columns("jobs", {"output": "TEXT"}):  # a store from before the column: fill it once
            self._db.execute("UPDATE jobs SET output = json_extract(request, '$.output')")
        self._add_missing_columns(
            "rows",
            {
                "render_attempts": "INTEGER NOT NULL DEFAULT 0",
                "resumed_from_segment": "INTEGER",
                "rows_in_batch": "INTEGER NOT NULL DEFAULT 0",
            },
        )
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._db.executescript(_SCHEMA)
        if "jobs" in tables and "job_tasks" not in tables:  # a store that kept the tasks inside the request
            self._db.executescript(
                "BEGIN; INSERT INTO job_tasks (job_id, tasks) SELECT job_id, json_extract(request, '$.tasks') "
                "FROM jobs WHERE json_type(request, '$.tasks') = 'array'; "
                "UPDATE jobs SET request = json_remove(request, '$.tasks') WHERE json_type(request, '$.tasks') "
                "IS NOT NULL; COMMIT;"
            )

    def _add_missing_columns(self, table: str, columns: dict[str, str]) -> list[str]:
        """Columns added since a store was created, added to it; returns those that were missing."""
        present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
        missing = [name for name in columns if present and name not in present]
        for name in missing:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {columns[name]}")
        return missing

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._owner)  # releases the state dir

    def add(self, job: JobRecord, tasks: list[dict] | None = None) -> None:
        """A new job, and the rows it will run (`tasks`, kept apart from the request: see `tasks`)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    f"INSERT INTO jobs ({_JOB_COLUMNS}, output) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.job_id,
                        json.dumps(job.request),
                        job.state,
                        job.created,
                        job.started,
                        job.finished,
                        job.rows_total,
                        int(job.cancel_requested),
                        job.attempts,
                        job.error,
                        job.request.get("output"),
                    ),
                )
                if tasks is not None:
                    self._db.execute(
                        "INSERT INTO job_tasks (job_id, tasks) VALUES (?, ?)", (job.job_id, json.dumps(tasks))
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def tasks(self, job_id: str) -> list[dict] | None:
        """The rows a job runs, as submission checked them (None: a job stored before submissions kept them). Read
        only to run a job: a 10,000-row job's tasks are megabytes of JSON that no status read should parse."""
        with self._lock:
            row = self._db.execute("SELECT tasks FROM job_tasks WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list(self, *, state: str | None = None, limit: int = 100, offset: int = 0) -> list[JobRecord]:
        """Newest first."""
        where, args = ("WHERE state = ?", [state]) if state else ("", [])
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
        return [_job_from_row(r) for r in rows]

    def outputs(self) -> list[JobOutput]:
        """Every job's output root and state (without loading the requests)."""
        with self._lock:
            rows = self._db.execute("SELECT job_id, output, state FROM jobs WHERE output IS NOT NULL").fetchall()
        return [JobOutput(job_id=j, output=o, state=s) for j, o, s in rows]

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: the order a restarted service runs them in."""
        marks = ",".join("?" * len(UNFINISHED_STATES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY seq", UNFINISHED_STATES
            ).fetchall()
        return [_job_from_row(r) for r in rows]

    def update(self, job_id: str, **fields) -> None:
        allowed = {"state", "started", "finished", "rows_total", "cancel_requested", "attempts", "error"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update job fields {sorted(set(fields) - allowed)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*fields.values(), job_id))

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in JOB_STATES} | dict(rows)

    def put_row(self, job_id: str, row: RowResult) -> None:
        """Record a finished row. A row the pipeline skipped because an earlier attempt of this job already
        rendered it keeps its earlier record (a restart must not turn 'succeeded' into 'skipped')."""
        with self._lock:
            if row.status == RowStatus.SKIPPED:
                prior = self._db.execute(
                    "SELECT status FROM rows WHERE job_id = ? AND row_id = ?", (job_id, row.id)
                ).fetchone()
                if prior and prior[0] == RowStatus.SUCCEEDED:
                    return
            self._db.execute(
                "INSERT OR REPLACE INTO rows (job_id, row_id, status, output, error, error_kind, frames, "
                "video_seconds, duration_s, timings, metrics, render_attempts, resumed_from_segment, rows_in_batch) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    row.id,
                    row.status.value,
                    row.output,
                    row.error,
                    row.error_kind,
                    row.frames,
                    row.video_seconds,
                    row.duration_s,
                    json.dumps(row.timings, default=str),
                    json.dumps(row.metrics, default=str),
                    row.render_attempts,
                    row.resumed_from_segment,
                    row.rows_in_batch,
                ),
            )

    def rows(self, job_id: str) -> list[RowResult]:
        return self._rows("job_id = ?", (job_id,))

    def row(self, job_id: str, row_id: str) -> RowResult | None:
        """One finished row of a job (the console's thumbnails and video links look them up one at a time)."""
        found = self._rows("job_id = ? AND row_id = ?", (job_id, row_id))
        return found[0] if found else None

    def _rows(self, where: str, params: tuple) -> list[RowResult]:
        with self._lock:
            found = self._db.execute(
                "SELECT row_id, status, output, error, error_kind, frames, video_seconds, duration_s, timings, "
                "metrics, render_attempts, resumed_from_segment, rows_in_batch "
                f"FROM rows WHERE {where} ORDER BY rowid",
                params,
            ).fetchall()
        return [
            RowResult(
                id=r[0],
                status=r[1],
                output=r[2],
                error=r[3],
                error_kind=r[4],
                frames=r[5],
                video_seconds=r[6],
                duration_s=r[7],
                timings=json.loads(r[8]),
                metrics=json.loads(r[9]),
                render_attempts=r[10],
                resumed_from_segment=r[11],
                rows_in_batch=r[12],
            )
            for r in found
        ]

    def row_totals(self, job_id: str) -> tuple[dict[str, int], int, float]:
        """(rows by status, frames, video-seconds) over the job's finished rows."""
        with self._lock:
            by_status = self._db.execute(
                "SELECT status, COUNT(*), SUM(frames), SUM(video_seconds) FROM rows WHERE job_id = ? GROUP BY status",
                (job_id,),
            ).fetchall()
        counts = {status: n for status, n, _, _ in by_status}
        frames = sum(int(f or 0) for _, _, f, _ in by_status)
        seconds = sum(float(s or 0.0) for _, _, _, s in by_status)
        return counts, frames, seconds

    def pending_rows(self) -> int:
        """Rows of queued and running jobs (those whose row count is known) that have not finished."""
        marks = ",".join("?" * len(UNFINISHED_STATES))
        with self._lock:
            (total,) = self._db.execute(
                f"SELECT COALESCE(SUM(rows_total), 0) FROM jobs WHERE state IN ({marks}) AND rows_total IS NOT NULL",
                UNFINISHED_STATES,
            ).fetchone()
            (finished,) = self._db.execute(
                f"SELECT COUNT(*) FROM rows JOIN jobs USING (job_id) WHERE jobs.state IN ({marks}) "
                "AND jobs.rows_total IS NOT NULL",
                UNFINISHED_STATES,
            ).fetchone()
        return max(0, int(total) - int(finished))


def _lock_state_dir(state_dir: Path) -> int:
    """An exclusive lock on the state dir's lock file, held by the returned descriptor (the kernel drops it
    when the process dies, so a crashed service never leaves the directory locked)."""
    path = state_dir / "service.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirLocked(
            f"state dir {state_dir} is in use by another avatar-render service (pid {holder}); "
            "stop it or give this one its own AVATAR_RENDER_STATE_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
