"""What a running job reports: the row status, the finished-row record, and the events.

Render actors and pipeline stages emit the events; the CLI turns them into progress bars, the HTTP service into job
status and Prometheus metrics. They cross process boundaries (Ray), so they hold only plain values.

`RowResult` is the one description of a row's outcome: a line of report.jsonl, the payload of `RowFinished`, and
an entry of the service's `GET /v1/jobs/{id}/rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field


class RowStatus(StrEnum):
    """Where a row stands. Inside the pipeline a row is PENDING, then RENDERED; it ends in one of FINAL_STATUSES.
    The service lists a row an actor is rendering now as RUNNING, and counts rows not yet started as PENDING."""

    PENDING = "pending"  # validated, waiting for its inputs or a render actor
    RENDERED = "rendered"  # segments stored, waiting for the writer
    RUNNING = "running"  # started by a render actor, not finished (the service's live view)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # its output already existed
    CANCELLED = "cancelled"  # stopped at a block boundary; its segments are kept for a later run


STAGES = ("validate", "fetch", "render", "write", "report")  # the pipeline's stages, as StageTimed names them
ERROR_KINDS = ("validation", "input", "fetch", "render", "write", "cancelled", "internal")  # RowResult.error_kind

FINAL_STATUSES = frozenset({RowStatus.SUCCEEDED, RowStatus.FAILED, RowStatus.SKIPPED, RowStatus.CANCELLED})
OK_STATUSES = frozenset({RowStatus.SUCCEEDED, RowStatus.SKIPPED})  # the row's output exists


class RowResult(BaseModel):
    """One row's outcome (or, in the service's live view, a RUNNING row's progress so far)."""

    id: str
    status: RowStatus
    output: str | None = None  # the output URI, when it exists (OK_STATUSES)
    error: str | None = None
    error_kind: str | None = None  # one of ERROR_KINDS
    frames: int = 0
    video_seconds: float = 0.0
    duration_s: float | None = None  # wall seconds of the row's stages together; None while it runs
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage: fetch, render (generate inside), write
    metrics: dict = Field(default_factory=dict)  # quality metrics (model.eval), where computed
    rows_in_batch: int = 0  # the most rows its render actor's engine advanced together while rendering it (0: none)
    # Times a render actor started the row in the job (more than 1 when an actor or its node was lost and the row
    # retried; counted by the job's progress actor), and the stored segment its last start continued after (None:
    # from the start).
    render_attempts: int = 0
    resumed_from_segment: int | None = None


@dataclass(frozen=True)
class RowStarted:
    job_id: str
    row_id: str
    actor_id: str
    resumed_from_block: int  # 0 for a fresh render
    reopened: bool = False  # started again by the same actor after its segment encoder was killed (not an attempt)


@dataclass(frozen=True)
class BlockRendered:
    job_id: str
    row_id: str
    actor_id: str
    block_index: int
    frames: int  # video frames in this block
    video_seconds: float
    generate_seconds: float  # wall time the actor spent generating this block


@dataclass(frozen=True)
class StageTimed:
    job_id: str
    stage: str  # one of STAGES
    seconds: float


@dataclass(frozen=True)
class RowFinished:
    """A row reached a final status; `row` is what the report will say about it."""

    job_id: str
    row: RowResult

    @property
    def row_id(self) -> str:  # as every row event has
        return self.row.id


Event = RowStarted | BlockRendered | StageTimed | RowFinished
