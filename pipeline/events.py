"""What a running job reports, as plain dataclasses.

Render actors and pipeline stages emit these; the CLI turns them into progress bars, the HTTP service into job
status and Prometheus metrics. They cross process boundaries (Ray), so they hold only plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RowStatus = Literal["succeeded", "failed", "skipped", "cancelled"]


@dataclass(frozen=True)
class RowStarted:
    job_id: str
    row_id: str
    actor_id: str
    resumed_from_block: int  # 0 for a fresh render


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
    stage: str  # "validate" | "fetch" | "render" | "write" | "report"
    seconds: float


@dataclass(frozen=True)
class RowFinished:
    job_id: str
    row_id: str
    status: RowStatus
    output: str | None = None
    error: str | None = None
    error_kind: str | None = None  # e.g. "input", "render", "storage", "cancelled"
    frames: int = 0
    video_seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


Event = RowStarted | BlockRendered | StageTimed | RowFinished
