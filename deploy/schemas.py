"""The HTTP API's request and response bodies (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deploy.store import JobState
from pipeline.events import RowResult

MAX_LIST_OFFSET = 1_000_000_000  # paging past any store's size (API and console); more is a 422, not a database error


class JobRequest(BaseModel):
    """Submit either a manifest URI or inline rows (exactly one). Rows use the manifest's columns:
    `id`, `portrait`, `audio`, optional `prompt`, `output`, `truth_video` and per-row overrides."""

    model_config = ConfigDict(extra="forbid")

    manifest: str | None = Field(default=None, description="URI of a JSONL, CSV or Parquet manifest")
    rows: list[dict[str, Any]] | None = Field(default=None, min_length=1, description="inline manifest rows")
    output: str | None = Field(default=None, description="output root URI; default: <first output root>/<job id>")
    actors: int | None = Field(default=None, ge=1, description="render actors; default: the service setting")
    force: bool = Field(default=False, description="render rows again even if their outputs exist")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the pipeline as-is")


class JobAccepted(BaseModel):
    job_id: str
    state: JobState


class JobStatus(BaseModel):
    job_id: str
    state: JobState
    created: float
    started: float | None
    finished: float | None
    manifest: str | None
    output: str
    rows_total: int | None = Field(description="None until known (a manifest job before its report)")
    counts: dict[str, int] = Field(description="rows by status, including 'running' and 'pending'")
    progress: float | None = Field(description="finished rows / rows_total, in [0, 1]")
    frames: int
    video_seconds: float = Field(description="seconds of video rendered, finished rows and rows in flight")
    eta_seconds: float | None
    cancel_requested: bool
    attempts: int
    error: str | None


class JobList(BaseModel):
    jobs: list[JobStatus]


class RowList(BaseModel):
    job_id: str
    rows: list[RowResult] = Field(description="finished rows, then rows in flight (status 'running')")


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    field: str | None = Field(default=None, description="the first offending field, dotted (rows.3.audio)")
    problems: list[FieldProblem] = Field(default_factory=list)
