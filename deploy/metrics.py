"""Prometheus metrics of the service, prefix `avatar_render_`, in a registry owned by the app (no global one).

Throughput metrics are fed from the pipeline's events (`pipeline.events`); job and queue gauges are read from
the job store at scrape time, so they are right after a restart too. Totals over actors are
`sum(...)` of the per-actor series. The same events feed `history`, the recent throughput the console draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from deploy.history import ThroughputHistory
from pipeline.events import (
    ERROR_KINDS,
    FINAL_STATUSES,
    STAGES,
    BlockRendered,
    Event,
    RowFinished,
    RowStarted,
    RowStatus,
    StageTimed,
)

PREFIX = "avatar_render"
# Stage latencies run from milliseconds (validate) to hours (rendering a long row).
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
REJECTED_CODES = ("409", "413", "422", "429")  # the statuses SubmitError and the body limit count
BLOCK_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StoreGauges(Collector):
    """Jobs by state and rows still to render, computed when Prometheus scrapes."""

    def __init__(self, jobs_by_state: Callable[[], dict[str, int]], pending_rows: Callable[[], int]):
        self._jobs_by_state = jobs_by_state
        self._pending_rows = pending_rows

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state", labels=["state"])
        for state, n in sorted(self._jobs_by_state().items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_rows", "Rows of queued and running jobs not yet finished", value=self._pending_rows()
        )


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, history: ThroughputHistory | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.history = history or ThroughputHistory()
        r = self.registry
        self.jobs_submitted = Counter(f"{PREFIX}_jobs_submitted_total", "Jobs accepted", registry=r)
        self.requests_rejected = Counter(
            f"{PREFIX}_requests_rejected_total",
            "Requests refused by a limit or as invalid, by HTTP status",
            ["code"],
            registry=r,
        )
        self.rows = Counter(f"{PREFIX}_rows_total", "Rows finished, by status", ["status"], registry=r)
        self.rows_started = Counter(
            f"{PREFIX}_rows_started_total", "Rows begun by a render actor", ["actor"], registry=r
        )
        self.failures = Counter(f"{PREFIX}_row_failures_total", "Failed rows, by kind of error", ["kind"], registry=r)
        self.frames = Counter(f"{PREFIX}_frames_rendered_total", "Video frames rendered", ["actor"], registry=r)
        self.video_seconds = Counter(
            f"{PREFIX}_video_seconds_rendered_total", "Seconds of video rendered", ["actor"], registry=r
        )
        self.generate_seconds = Counter(
            f"{PREFIX}_generate_seconds_total", "Wall seconds actors spent generating", ["actor"], registry=r
        )
        self.actor_fps = Gauge(
            f"{PREFIX}_actor_fps",
            "Generation speed of an actor's latest block, frames per second",
            ["actor"],
            registry=r,
        )
        self.block_seconds = Histogram(
            f"{PREFIX}_block_generate_seconds",
            "Wall seconds to generate one block",
            buckets=BLOCK_BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_seconds", "Latency of a pipeline stage", ["stage"], buckets=STAGE_BUCKETS_S, registry=r
        )

        # Every known label value starts at zero, so that the first event is an increase Prometheus can see
        # (rate() and increase() never count a series' first sample) and a dashboard panel has data from the start.
        for code in REJECTED_CODES:
            self.requests_rejected.labels(code)
        for status in sorted(FINAL_STATUSES):
            self.rows.labels(status.value)
        for kind in ERROR_KINDS:
            self.failures.labels(kind)
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    def watch_store(self, jobs_by_state: Callable[[], dict[str, int]], pending_rows: Callable[[], int]) -> None:
        self.registry.register(_StoreGauges(jobs_by_state, pending_rows))
        self.history.watch_queue(jobs_by_state, pending_rows)

    def observe(self, event: Event) -> None:
        """Account one pipeline event."""
        self.history.observe(event)
        if isinstance(event, BlockRendered):
            self.frames.labels(event.actor_id).inc(event.frames)
            self.video_seconds.labels(event.actor_id).inc(event.video_seconds)
            self.generate_seconds.labels(event.actor_id).inc(event.generate_seconds)
            self.block_seconds.observe(event.generate_seconds)
            if event.generate_seconds > 0:
                self.actor_fps.labels(event.actor_id).set(event.frames / event.generate_seconds)
        elif isinstance(event, StageTimed):
            self.stage_seconds.labels(event.stage).observe(event.seconds)
        elif isinstance(event, RowStarted):
            self.rows_started.labels(event.actor_id).inc()
            # The actor's throughput series start at 0 with its first row, so a rate() over them counts the first
            # block's frames too (Prometheus cannot count the increase into a series' first sample).
            for counter in (self.frames, self.video_seconds, self.generate_seconds):
                counter.labels(event.actor_id)
        elif isinstance(event, RowFinished):
            self.rows.labels(event.row.status.value).inc()
            if event.row.status == RowStatus.FAILED:
                self.failures.labels(event.row.error_kind or "unknown").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
