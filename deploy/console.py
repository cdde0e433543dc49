"""The web console under /console: the pages producers and operators watch the night's renders on.

    mount_console(app, manager, history, settings)      # done by create_app; the same app, no other server

Pages are rendered on the server (Jinja2, deploy/templates) from the same JobManager the JSON API answers from:
the job list (state, progress, ETA, a submit form, the throughput and queue charts) and a job page (its rows with
status, error, duration, frames, quality metrics, a thumbnail strip and a link to the video; a cancel button).
The one script, deploy/static/console.js, refreshes the page while a job runs and draws the charts with uPlot
(vendored under deploy/static/vendor, `make vendor-js`); without it the pages still work and reload themselves.

Auth follows the API's rule: when the service has a token (it must, unless bound to loopback), every console
route asks for it, as a bearer header or as the session cookie the login form sets (an HMAC of the token,
HttpOnly, SameSite=Lax, path /console). Every form also carries a CSRF token derived from a per-process
secret, so that no other web site can make a browser submit or cancel jobs, not even on a loopback service
without a token. Submissions go through `JobManager.submit` exactly as a JSON one does: an uploaded manifest
(`.jsonl` or `.csv`, within the request-size limit) becomes inline rows, whose media are confined to the input
roots like any other.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from deploy.history import ThroughputHistory
from deploy.jobs import TERMINAL_STATES, JobManager, SubmitError
from deploy.schemas import JobRequest
from deploy.settings import ServiceSettings
from deploy.thumbnails import ThumbnailCache
from pipeline.events import OK_STATUSES, RowResult
from pipeline.manifest import read_manifest
from pipeline.storage import ObjectStore
from pipeline.uri import confine

HERE = Path(__file__).parent
SESSION_COOKIE = "avatar_render_session"
UPLOAD_FORMATS = (".jsonl", ".csv")  # text manifests: their memory is bounded by their bytes
JOBS_PER_PAGE = 50
MAX_OFFSET = 1_000_000_000  # paging past any store's size; more is a 422, not a database error
ERROR_CHARS = 200  # a row's error in the table: its first line, this long at most (the whole text on hover)
REFRESH_ACTIVE_S = 2  # while a job is queued or running
REFRESH_IDLE_S = 15  # the job list, so that a job submitted elsewhere shows up


class ConsoleRefused(Exception):
    """A console request refused: a page asked for without a session goes to the login form (`login_next`);
    anything else gets `status` and a one-line reason."""

    def __init__(self, status: int, reason: str, login_next: str | None = None):
        self.status, self.reason, self.login_next = status, reason, login_next


def mount_console(app: FastAPI, manager: JobManager, history: ThroughputHistory, settings: ServiceSettings) -> None:
    app.include_router(_router(manager, history, settings))
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.exception_handler(ConsoleRefused)
    async def refused(request: Request, exc: ConsoleRefused):
        if exc.login_next is not None:
            return RedirectResponse(f"/console/login?next={quote(exc.login_next)}", status_code=303)
        return PlainTextResponse(exc.reason, status_code=exc.status)


def _router(manager: JobManager, history: ThroughputHistory, settings: ServiceSettings) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters.update(
        duration=format_duration, when=format_time, number=format_number, one_line=one_line, percent=format_percent
    )
    store = ObjectStore(settings.pipeline.storage)
    console = settings.console
    thumbnails = ThumbnailCache(
        settings.state_dir / "thumbnails",
        store,
        height=console.thumbnail_height,
        max_bytes=console.thumbnail_cache_bytes,
    )
    token = settings.auth_token.get_secret_value().encode() if settings.auth_token else None
    session_value = hmac.new(token, b"avatar-render console session", hashlib.sha256).hexdigest() if token else ""
    csrf_token = hmac.new(secrets.token_bytes(32), b"avatar-render console form", hashlib.sha256).hexdigest()

    def signed_in(request: Request) -> bool:
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
            return True
        return hmac.compare_digest(request.cookies.get(SESSION_COOKIE, "").encode(), session_value.encode())

    def require_session(request: Request, *, page: bool = True) -> None:
        """A page (GET) without a session goes to the login form; anything else is a 401."""
        if signed_in(request):
            return
        if page and request.method == "GET":
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise ConsoleRefused(401, "log in", login_next=path)
        raise ConsoleRefused(401, "log in to the console, or send the bearer token")

    async def checked_form(request: Request, *, max_files: int = 0):
        """The form of a console POST: signed in (checked before the body is read) and carrying the CSRF token."""
        require_session(request, page=False)
        form = await request.form(max_files=max_files, max_fields=8)
        given = form.get("csrf")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), csrf_token.encode()):
            raise ConsoleRefused(403, "this form has expired or came from another site; reload the page")
        return form

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context = {"csrf": csrf_token, "auth": token is not None, "now": time.time(), **context}
        return templates.TemplateResponse(request, name, context, status_code=status)

    def not_found(request: Request, what: str) -> HTMLResponse:
        return page(request, "message.html", 404, title="Not found", message=what, refresh=0)

    def row_output(job_id: str, row_id: str) -> tuple[RowResult, str] | None:
        """A finished row's video, its URI confined to the output roots exactly as it will be read."""
        row = manager.store.row(job_id, row_id)
        if row is None or row.status not in OK_STATUSES or not row.output:
            return None
        try:
            return row, confine(row.output, settings.effective_output_roots())
        except ValueError:
            return None

    def jobs_page(request: Request, status: int = 200, offset: int = 0, **context) -> HTMLResponse:
        jobs = manager.list(limit=JOBS_PER_PAGE + 1, offset=offset)
        active = any(job.state not in TERMINAL_STATES for job in jobs)
        return page(
            request,
            "jobs.html",
            status,
            jobs=jobs[:JOBS_PER_PAGE],
            offset=offset,
            more=len(jobs) > JOBS_PER_PAGE,
            per_page=JOBS_PER_PAGE,
            refresh=REFRESH_ACTIVE_S if active else REFRESH_IDLE_S,
            throughput=history.series(console.throughput_hours),
            upload_limit=settings.max_request_bytes,
            **context,
        )

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/console", status_code=307)

    @router.get("/console/login")
    async def login_form(request: Request, next: str = "/console"):
        if token is None:
            return RedirectResponse("/console", status_code=303)
        return page(request, "login.html", next=_safe_next(next), error=None, refresh=0, auth=False)

    @router.post("/console/login")
    async def login(request: Request):
        form = await request.form(max_files=0, max_fields=4)
        next_path = _safe_next(str(form.get("next") or "/console"))
        given = form.get("token")
        if token is None:
            return RedirectResponse(next_path, status_code=303)
        if not isinstance(given, str) or not hmac.compare_digest(given.strip().encode(), token):
            return page(request, "login.html", 401, next=next_path, error="wrong token", refresh=0, auth=False)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session_value,
            httponly=True,
            samesite="lax",  # sent when a link is followed from elsewhere, never with another site's POST
            secure=request.url.scheme == "https",
            path="/console",
        )
        return response

    @router.post("/console/logout")
    async def logout(request: Request):
        await checked_form(request)
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/console")
        return response

    @router.get("/console")
    async def jobs(request: Request, offset: int = Query(default=0, ge=0, le=MAX_OFFSET)):
        require_session(request)
        return jobs_page(request, offset=offset)

    @router.post("/console/jobs")
    async def submit(request: Request):
        form = await checked_form(request, max_files=1)
        manifest = str(form.get("manifest") or "").strip()
        output = str(form.get("output") or "").strip() or None
        upload = form.get("upload")
        upload = upload if isinstance(upload, UploadFile) and upload.filename else None
        entered = {"manifest": manifest, "output": output or ""}
        try:
            if (upload is None) == (not manifest):
                raise SubmitError(422, "manifest", "give a manifest URI or upload a manifest file, not both")
            if upload is not None:
                rows = await _uploaded_rows(upload, settings.max_request_bytes)
                job_request = JobRequest(rows=rows, output=output)
            else:
                job_request = JobRequest(manifest=manifest, output=output)
            job = await run_in_threadpool(manager.submit, job_request)
        except SubmitError as err:
            message = f"{err.field}: {err.problem}"
            return jobs_page(request, err.status, submit_error=message, entered=entered)
        except ValidationError as err:
            first = err.errors()[0]
            message = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
            return jobs_page(request, 422, submit_error=message, entered=entered)
        return RedirectResponse(f"/console/jobs/{quote(job.job_id)}", status_code=303)

    @router.get("/console/throughput.json")
    async def throughput(request: Request, hours: float | None = None):
        require_session(request, page=False)
        if hours is not None and not (0 < hours <= console.throughput_hours):
            hours = console.throughput_hours
        return history.series(hours)

    @router.get("/console/jobs/{job_id}")
    async def job_page(
        request: Request, job_id: str, status: str | None = None, offset: int = Query(default=0, ge=0, le=MAX_OFFSET)
    ):
        require_session(request)
        job = manager.status(job_id)
        if job is None:
            return not_found(request, f"no job {job_id!r}")
        rows = manager.rows(job_id) or []
        statuses = sorted({row.status.value for row in rows})
        if status:
            rows = [row for row in rows if row.status.value == status]
        per_page = console.rows_per_page
        return page(
            request,
            "job.html",
            job=job,
            rows=rows[offset : offset + per_page],
            rows_shown=len(rows),
            offset=offset,
            per_page=per_page,
            status_filter=status or "",
            statuses=statuses,
            ok_statuses={s.value for s in OK_STATUSES},
            refresh=REFRESH_ACTIVE_S if job.state not in TERMINAL_STATES else 0,
        )

    @router.post("/console/jobs/{job_id}/cancel")
    async def cancel(request: Request, job_id: str):
        await checked_form(request)
        if manager.store.get(job_id) is None:
            return not_found(request, f"no job {job_id!r}")
        manager.cancel(job_id)
        return RedirectResponse(f"/console/jobs/{quote(job_id)}", status_code=303)

    @router.get("/console/jobs/{job_id}/thumbnail")
    def thumbnail(request: Request, job_id: str, row: str):
        require_session(request, page=False)
        found = row_output(job_id, row)
        if found is None:
            return Response(status_code=404)
        try:
            data = thumbnails.strip(job_id, *found)
        except (OSError, ValueError):  # the video went missing or cannot be read: no strip, the page stays
            return Response(status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/console/jobs/{job_id}/video")
    def video(request: Request, job_id: str, row: str):
        require_session(request)
        found = row_output(job_id, row)
        if found is None:
            return not_found(request, f"no video for row {row!r} of job {job_id!r}")
        _, uri = found
        if uri.startswith("s3://"):
            return RedirectResponse(store.presigned_url(uri, expires_s=900), status_code=307)
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            return not_found(request, f"the video of row {row!r} is gone")
        return FileResponse(path, media_type="video/mp4")

    return router


async def _uploaded_rows(upload: UploadFile, max_bytes: int) -> list[dict]:
    """An uploaded manifest's rows, read by the pipeline's own reader; a line it cannot parse refuses the upload
    (the person is there to fix it)."""
    ext = os.path.splitext(upload.filename or "")[1].lower()
    if ext not in UPLOAD_FORMATS:
        raise SubmitError(422, "upload", f"upload a {' or '.join(UPLOAD_FORMATS)} manifest (Parquet: give its URI)")
    data = await upload.read(max_bytes + 1)  # the body limit already bounds it; this bounds the read anyway
    if len(data) > max_bytes:
        raise SubmitError(413, "upload", f"manifest over {max_bytes} bytes")
    return await run_in_threadpool(_parse_upload, data, ext, upload.filename)


def _parse_upload(data: bytes, ext: str, filename: str) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="avatar-upload-") as tmp:
        path = os.path.join(tmp, "manifest" + ext)
        with open(path, "wb") as f:
            f.write(data)
        try:
            rows = read_manifest(path, ObjectStore())
        except (ValueError, UnicodeDecodeError) as err:
            reason = str(err).replace("file://" + path, filename).replace(path, filename)
            raise SubmitError(422, "upload", f"cannot read the manifest: {reason}") from None
    problems = [row for row in rows if isinstance(row, str)]
    if problems:
        raise SubmitError(422, "upload", problems[0])
    if not rows:
        raise SubmitError(422, "upload", "the manifest has no rows")
    return rows


def _safe_next(path: str) -> str:
    """Where to go after logging in: a console path of this service, never another site."""
    if not path.startswith("/console") or "//" in path or "\\" in path:
        return "/console"
    return path


# -- template filters ---------------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_number(value, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def format_percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def one_line(text: str | None) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"
