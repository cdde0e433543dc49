"""The row record every Ray Data stage receives and returns.

Its columns have fixed types (text, bytes, int) whatever happened to the row, so Arrow blocks from
different stages and rows always share one schema. A failed row flows on as a record with status
FAILED and its error; stages pass such records through untouched. `to_result` gives the row's outcome
as the report, the events and the service show it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from pipeline.events import OK_STATUSES, RowResult, RowStatus
from pipeline.manifest import RowTask


@dataclass
class RowRecord:
    task: RowTask
    status: RowStatus = RowStatus.PENDING
    error: str = ""
    error_kind: str = ""
    portrait: bytes = b""  # .npy of the decoded portrait (uint8 H, W, 3), dropped after render
    audio: bytes = b""  # float32 mono samples at the model's rate, dropped after render
    result: dict = field(default_factory=dict)  # frames, fps, video_seconds, segments, blocks, actor_id
    timings: dict = field(default_factory=dict)  # seconds per stage

    def fail(self, kind: str, error: str) -> RowRecord:
        self.status, self.error_kind, self.error = RowStatus.FAILED, kind, error
        self.portrait = self.audio = b""
        return self

    def to_row(self) -> dict:
        return {
            "index": self.task.index,
            "task": self.task.model_dump_json(),
            "status": str(self.status),
            "error": self.error,
            "error_kind": self.error_kind,
            "portrait": self.portrait,
            "audio": self.audio,
            "result": json.dumps(self.result),
            "timings": json.dumps(self.timings),
        }

    def to_result(self) -> RowResult:
        return RowResult(
            id=self.task.id,
            status=self.status,
            output=self.task.output if self.status in OK_STATUSES else None,
            error=self.error or None,
            error_kind=self.error_kind or None,
            frames=self.result.get("frames", 0),
            video_seconds=self.result.get("video_seconds", 0.0),
            duration_s=sum(seconds for stage, seconds in self.timings.items() if stage != "generate"),  # inside render
            timings=dict(self.timings),
            metrics=dict(self.result.get("metrics", {})),
            rows_in_batch=self.result.get("rows_in_batch", 0),
            render_attempts=self.result.get("render_attempts", 0),
            resumed_from_segment=self.result.get("resumed_from_segment"),
        )

    @classmethod
    def from_row(cls, row: dict) -> RowRecord:
        return cls(
            task=RowTask.model_validate_json(row["task"]),
            status=RowStatus(row["status"]),
            error=row["error"],
            error_kind=row["error_kind"],
            portrait=bytes(row["portrait"]),
            audio=bytes(row["audio"]),
            result=json.loads(row["result"]),
            timings=json.loads(row["timings"]),
        )


def initial_record(task: RowTask) -> RowRecord:
    record = RowRecord(task=task)
    return record.fail("validation", task.error) if task.error else record


def array_to_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
