"""The row record every Ray Data stage receives and returns.

Its columns have fixed types (text, bytes, int) whatever happened to the row, so Arrow blocks from
different stages and rows always share one schema. A failed row flows on as a record with `status`
"failed" and its error; stages pass such records through untouched.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from pipeline.manifest import RowTask

# Statuses between stages; the final ones are pipeline.events.RowStatus.
PENDING = "pending"  # validated, waiting for its inputs / render
RENDERED = "rendered"  # segments stored, waiting for the writer


@dataclass
class RowRecord:
    task: RowTask
    status: str = PENDING
    error: str = ""
    error_kind: str = ""
    portrait: bytes = b""  # .npy of the decoded portrait (uint8 H, W, 3), dropped after render
    audio: bytes = b""  # float32 mono samples at the model's rate, dropped after render
    result: dict = field(default_factory=dict)  # frames, fps, video_seconds, segments, blocks, actor_id
    timings: dict = field(default_factory=dict)  # seconds per stage

    def fail(self, kind: str, error: str) -> RowRecord:
        self.status, self.error_kind, self.error = "failed", kind, error
        self.portrait = self.audio = b""
        return self

    def to_row(self) -> dict:
        return {
            "index": self.task.index,
            "task": self.task.model_dump_json(),
            "status": self.status,
            "error": self.error,
            "error_kind": self.error_kind,
            "portrait": self.portrait,
            "audio": self.audio,
            "result": json.dumps(self.result),
            "timings": json.dumps(self.timings),
        }

    @classmethod
    def from_row(cls, row: dict) -> RowRecord:
        return cls(
            task=RowTask.model_validate_json(row["task"]),
            status=row["status"],
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
