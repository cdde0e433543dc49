"""The HTTP API (FastAPI): submit, list, inspect and cancel jobs; health; Prometheus metrics.

    app = create_app(ServiceSettings())       # served by Ray Serve (deploy/serve_app.py) or uvicorn

Every client error is a 4xx with a JSON body `{"error", "field", "problems"}` naming the offending field;
an over-limit submission is 413 (request or manifest bytes) or 429 (rows, pending jobs); an output that
overlaps another job's is 409. A bearer token, when set, guards every /v1 route; /healthz and /metrics stay
open for probes and scrapers. A request naming a host the service does not answer to (`allowed_hosts`; without a
token only the loopback names) is a 400 before any route runs (deploy/auth.py). The web console for people
(`/console`, deploy/console.py) is part of the same app and follows the same rules.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.auth import HostCheck, has_bearer_token
from deploy.console import mount_console
from deploy.history import ThroughputHistory
from deploy.jobs import JobManager, SubmitError
from deploy.metrics import ServiceMetrics
from deploy.schemas import (
    MAX_LIST_OFFSET,
    ErrorBody,
    FieldProblem,
    JobAccepted,
    JobList,
    JobRequest,
    JobStatus,
    RowList,
)
from deploy.settings import ServiceSettings
from deploy.store import JobStore

log = logging.getLogger(__name__)

ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429)}


def _error(status: int, error: str, field: str | None = None, problems: list[FieldProblem] | None = None):
    body = ErrorBody(error=error, field=field, problems=problems or [])
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, by the declared length or by counting what arrives
    (chunked uploads), before the body is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(scope, receive, send)
        # Read the whole body (at most max_bytes + 1) so an undeclared oversize body is caught too, then replay.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on_reject:
            self.on_reject()
        response = _error(413, f"request body over {self.max_bytes} bytes", field="body")
        await response(scope, receive, send)


def _field_name(loc: tuple) -> str:
    """('body', 'rows', 3, 'audio') -> 'rows.3.audio'; the 'body'/'query'/'path' prefix is dropped."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def create_app(settings: ServiceSettings, *, run_jobs: bool = True) -> FastAPI:
    """The service. `run_jobs=False` accepts and tracks jobs without rendering them (API tests)."""
    console = settings.console
    metrics = ServiceMetrics(history=ThroughputHistory(console.throughput_interval_s, console.throughput_hours * 3600))
    store = JobStore(settings.state_dir)
    manager = JobManager(settings, store, metrics, run_jobs=run_jobs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        metrics.history.start()
        try:
            yield
        finally:
            close_console()
            metrics.history.stop()
            manager.stop()
            store.close()

    app = FastAPI(
        title="avatar-render job service",
        version="1",
        description="Batch rendering of talking-avatar videos: submit a manifest, watch it render.",
        lifespan=lifespan,
    )
    app.state.manager, app.state.metrics, app.state.settings = manager, metrics, settings
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_request_bytes,
        on_reject=lambda: metrics.requests_rejected.labels("413").inc(),
    )
    app.add_middleware(HostCheck, allowed_hosts=settings.effective_allowed_hosts())  # outermost: before the body

    token = settings.bearer_token

    async def require_token(request: Request) -> None:
        if token is not None and not has_bearer_token(request, token):
            raise HTTPException(401, "missing or wrong bearer token")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = [
            FieldProblem(
                field="body" if e.get("type") == "json_invalid" else _field_name(tuple(e.get("loc", ()))),
                message=e.get("msg", "invalid"),
            )
            for e in exc.errors()
        ]
        first = problems[0].field if problems else None
        metrics.requests_rejected.labels("422").inc()
        return _error(
            422,
            f"invalid request: {first}: {problems[0].message}" if problems else "invalid request",
            field=first,
            problems=problems,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), field=getattr(exc, "field", None))

    @app.exception_handler(SubmitError)
    async def submit_refused(request: Request, exc: SubmitError):
        metrics.requests_rejected.labels(str(exc.status)).inc()
        return _error(exc.status, exc.problem, field=exc.field)

    def job_or_404(job_id: str) -> None:
        if manager.store.get(job_id) is None:
            error = HTTPException(404, f"no job {job_id!r}")
            error.field = "job_id"
            raise error

    guarded = [Depends(require_token)]
    # Reads answer from sqlite in well under a millisecond (a job's status parses its small request; its checked
    # rows, megabytes for a big job, live in their own table and are read only to run it), so they run on the event
    # loop (`async def`): a thread-pool hop would cost more than the query. Submission may read a manifest: sync.

    @app.post("/v1/jobs", status_code=202, response_model=JobAccepted, dependencies=guarded, responses=ERROR_RESPONSES)
    def submit_job(request: JobRequest) -> JobAccepted:
        job = manager.submit(request)
        return JobAccepted(job_id=job.job_id, state=job.state)

    @app.get("/v1/jobs", response_model=JobList, dependencies=guarded, responses=ERROR_RESPONSES)
    async def list_jobs(
        state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0, le=MAX_LIST_OFFSET),
    ) -> JobList:
        return JobList(jobs=manager.list(state=state, limit=limit, offset=offset))

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=guarded, responses=ERROR_RESPONSES)
    async def get_job(job_id: str) -> JobStatus:
        job_or_404(job_id)
        return manager.status(job_id)

    @app.get("/v1/jobs/{job_id}/rows", response_model=RowList, dependencies=guarded, responses=ERROR_RESPONSES)
    async def get_rows(job_id: str) -> RowList:
        job_or_404(job_id)
        return RowList(job_id=job_id, rows=manager.rows(job_id))

    @app.delete(
        "/v1/jobs/{job_id}", status_code=202, response_model=JobStatus, dependencies=guarded, responses=ERROR_RESPONSES
    )
    async def cancel_job(job_id: str) -> JobStatus:
        job_or_404(job_id)
        job = manager.cancel(job_id)
        if job.state in ("succeeded", "failed"):
            error = HTTPException(409, f"job {job_id} already {job.state}")
            error.field = "job_id"
            raise error
        return manager.status(job_id)

    @app.get("/healthz")
    async def health() -> dict:
        return {"status": "ok", "jobs": manager.store.count_by_state()}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    close_console = mount_console(app, manager, metrics.history, settings)
    return app
