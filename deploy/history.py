"""The service's recent throughput, for the console's chart: frames and video-seconds rendered per actor, and the
queue depth, in fixed intervals over the last hours, held in memory (a ring of at most `keep_s / interval_s`
points, so its size never depends on how much was rendered).

It is fed the same pipeline events as the Prometheus metrics (`ServiceMetrics.observe`) and samples the queue from
the job store at the end of each interval, on its own thread. Prometheus keeps the long history; this is what a
service without one can still draw.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.events import BlockRendered, Event

MAX_ACTORS_SHOWN = 8  # the chart draws the busiest actors of the window; the rest are summed as "other actors"
OTHER_ACTORS = "other actors"


@dataclass(frozen=True)
class _Point:
    end: float  # unix seconds at the end of the interval
    seconds: float  # the interval's length
    frames: dict[str, int]  # actor id -> frames rendered in the interval
    video_seconds: dict[str, float]
    queue_rows: int  # rows of queued and running jobs not finished, at the end of the interval
    jobs_queued: int
    jobs_running: int


@dataclass
class _Open:
    start: float
    frames: dict[str, int] = field(default_factory=dict)
    video_seconds: dict[str, float] = field(default_factory=dict)


class ThroughputHistory:
    def __init__(self, interval_s: float = 10.0, keep_s: float = 6 * 3600.0, clock: Callable[[], float] = time.time):
        self.interval_s = interval_s
        self.keep_s = keep_s
        self._clock = clock
        self._points: deque[_Point] = deque(maxlen=max(1, round(keep_s / interval_s)))
        self._open = _Open(start=clock())
        self._lock = threading.Lock()
        self._jobs_by_state: Callable[[], dict[str, int]] = lambda: {}
        self._pending_rows: Callable[[], int] = lambda: 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch_queue(self, jobs_by_state: Callable[[], dict[str, int]], pending_rows: Callable[[], int]) -> None:
        self._jobs_by_state, self._pending_rows = jobs_by_state, pending_rows

    def observe(self, event: Event) -> None:
        if isinstance(event, BlockRendered):
            with self._lock:
                frames, seconds = self._open.frames, self._open.video_seconds
                frames[event.actor_id] = frames.get(event.actor_id, 0) + event.frames
                seconds[event.actor_id] = seconds.get(event.actor_id, 0.0) + event.video_seconds

    def tick(self) -> None:
        """Close the open interval: its counts and a sample of the queue become a point."""
        jobs, pending = self._jobs_by_state(), self._pending_rows()  # sqlite, outside the lock
        now = self._clock()
        with self._lock:
            closed, self._open = self._open, _Open(start=now)
            self._points.append(
                _Point(
                    end=now,
                    seconds=max(now - closed.start, 1e-6),
                    frames=closed.frames,
                    video_seconds=closed.video_seconds,
                    queue_rows=pending,
                    jobs_queued=jobs.get("queued", 0),
                    jobs_running=jobs.get("running", 0),
                )
            )

    # -- the sampling thread (started and stopped with the app) -------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._open = _Open(start=self._clock())
        self._thread = threading.Thread(target=self._run, name="throughput-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # a store closing under us at shutdown; the next tick tries again
                if self._stop.is_set():
                    return

    # -- reading ------------------------------------------------------------------------------------------

    def series(self, hours: float | None = None) -> dict:
        """Columns for a chart, oldest first: `t` (unix seconds, interval ends), per-second rates of frames and
        video-seconds in total and for each of the window's busiest actors, and the queue samples."""
        with self._lock:
            points = list(self._points)
        if hours is not None:
            since = self._clock() - hours * 3600
            points = [p for p in points if p.end >= since]
        busiest: dict[str, int] = {}
        for p in points:
            for actor, n in p.frames.items():
                busiest[actor] = busiest.get(actor, 0) + n
        shown = sorted(busiest, key=lambda a: (-busiest[a], a))[:MAX_ACTORS_SHOWN]
        shown_set, others = set(shown), len(busiest) > len(shown)

        def rates(values: str) -> dict[str, list[float]]:
            by_actor: dict[str, list[float]] = {a: [] for a in shown}
            if others:
                by_actor[OTHER_ACTORS] = []
            total = []
            for p in points:
                counts = getattr(p, values)
                total.append(sum(counts.values()) / p.seconds)
                for a in shown:
                    by_actor[a].append(counts.get(a, 0) / p.seconds)
                if others:
                    by_actor[OTHER_ACTORS].append(sum(v for a, v in counts.items() if a not in shown_set) / p.seconds)
            return {"total": total, "actors": by_actor}

        return {
            "interval_s": self.interval_s,
            "t": [p.end for p in points],
            "frames_per_s": rates("frames"),
            "video_seconds_per_s": rates("video_seconds"),
            "queue_rows": [p.queue_rows for p in points],
            "jobs_queued": [p.jobs_queued for p in points],
            "jobs_running": [p.jobs_running for p in points],
        }
