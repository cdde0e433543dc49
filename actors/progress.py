"""The per-job progress actor: an ordered log of `pipeline.events`, a cancel flag, and the render actors.

Stages push events with a blocking call (`ray.get`, one round trip): a stage returns only once its events are in
the log, so when the dataset ends the driver's last poll sees every event, the rows' RowFinished included. The
render actor pays that round trip once per block and gets the cancel flag back with it (`push_and_check`);
fetch and write pay it once per row. The driver polls `events_since` with a cursor and hands each event to its
callback in arrival order. Render actors register their handles so that operators (and the resume test) can find
them.
"""

from __future__ import annotations

import ray

from pipeline.events import Event, RowStarted


class ProgressLog:
    """The actor's state and methods (`ProgressActor` is it as a Ray actor)."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.events: list[Event] = []
        self.cancelled = False
        self.render_actors: dict[str, ray.actor.ActorHandle] = {}
        self.render_actor_nodes: dict[str, str] = {}
        self.starts: dict[str, int] = {}  # row id -> RowStarted events: render attempts in this job

    def push(self, events: list[Event]) -> None:
        self.events.extend(events)
        for event in events:
            if isinstance(event, RowStarted) and not event.reopened:
                self.starts[event.row_id] = self.starts.get(event.row_id, 0) + 1

    def push_and_check(self, events: list[Event]) -> bool:
        """Push, and answer whether the job was cancelled."""
        self.push(events)
        return self.cancelled

    def render_attempts(self, row_id: str) -> int:
        """How many times a render actor started the row in this job (more than once: an actor or node was lost)."""
        return self.starts.get(row_id, 0)

    def events_since(self, cursor: int) -> tuple[list[Event], int]:
        new = self.events[cursor:]  # one read: a push served on another thread cannot slip between list and cursor
        return new, cursor + len(new)

    def cancel(self) -> None:
        self.cancelled = True

    def register_render_actor(self, actor_id: str, handle: ray.actor.ActorHandle, node_id: str = "") -> None:
        self.render_actors[actor_id] = handle
        self.render_actor_nodes[actor_id] = node_id

    def get_render_actors(self) -> dict[str, ray.actor.ActorHandle]:
        return dict(self.render_actors)

    def get_render_actor_nodes(self) -> dict[str, str]:
        """Render actor id -> the Ray node it runs on (without asking the actor, which is busy rendering)."""
        return dict(self.render_actor_nodes)


ProgressActor = ray.remote(num_cpus=0, max_concurrency=1)(ProgressLog)
