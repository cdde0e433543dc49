"""The per-job progress actor: an ordered log of `pipeline.events`, a cancel flag, and the render actors.

Render UDFs and writer tasks push events with fire-and-forget calls; the driver polls `events_since` with
a cursor and hands each event to its callback in arrival order. Render UDFs check `is_cancelled` before
every block. Render actors register their handles so that operators (and the resume test) can find them.
"""

from __future__ import annotations

import ray

from pipeline.events import Event


@ray.remote(num_cpus=0, max_concurrency=1)
class ProgressActor:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.events: list[Event] = []
        self.cancelled = False
        self.render_actors: dict[str, ray.actor.ActorHandle] = {}
        self.segments_stored: dict[str, int] = {}  # row id -> segments stored by this job

    def push(self, events: list[Event]) -> None:
        self.events.extend(events)

    def push_and_check(self, events: list[Event]) -> bool:
        self.events.extend(events)
        return self.cancelled

    def events_since(self, cursor: int) -> tuple[list[Event], int]:
        return self.events[cursor:], len(self.events)

    def cancel(self) -> None:
        self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled

    def register_render_actor(self, actor_id: str, handle: ray.actor.ActorHandle) -> None:
        self.render_actors[actor_id] = handle

    def get_render_actors(self) -> dict[str, ray.actor.ActorHandle]:
        return dict(self.render_actors)

    def segment_stored(self, row_id: str, segment_index: int) -> None:
        self.segments_stored[row_id] = self.segments_stored.get(row_id, 0) + 1

    def get_segments_stored(self) -> dict[str, int]:
        return dict(self.segments_stored)
