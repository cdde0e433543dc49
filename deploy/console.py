"""The web console under /console: the pages producers and operators watch the night's renders on.

    mount_console(app, manager, history, settings)      # done by create_app; the same app, no other server

Pages are rendered on the server (Jinja2, deploy/templates) from the same JobManager the JSON API answers from:
the job list (state, progress, ETA, a submit form, the throughput and queue charts) and a job page (its rows with
status, error, duration, frames, quality metrics, a thumbnail strip and a link to the video; a cancel button).
The one script, deploy/static/console.js, refreshes the page while a job runs and draws the charts with uPlot
(vendored under deploy/static/vendor, `make vendor-js`); without it the pages still work and reload themselves.

Auth follows the API's rules (deploy/auth.py). When the service has a token (it must, unless bound to loopback),
every console route asks for it, as a bearer header or as the session cookie the login form sets (its issue time
signed with a key derived from the token, HttpOnly, SameSite=Lax, path /console, `Secure` over https or behind a
TLS proxy; it stops working after `console.session_hours`, and logging out revokes it in this process). Every
form carries a CSRF token derived from a per-process secret and is refused when the browser says it was posted
from another origin. Without a token, the service answers only to the loopback host names, so a web page whose
DNS name is rebound to 127.0.0.1 cannot read the console or post to it; any local program can, which is what a
loopback service without a token means. Submissions go through `JobManager.submit` exactly as a JSON one does:
an uploaded manifest (`.jsonl` or `.csv`, within the request-size and row limits) becomes inline rows, whose
media are confined to the input roots like any other.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from deploy.auth import has_bearer_token, is_same_origin
from deploy.history import ThroughputHistory
from deploy.jobs import TERMINAL_STATES, JobManager, SubmitError
from deploy.schemas import MAX_LIST_OFFSET, JobRequest
from deploy.settings import ServiceSettings
from deploy.thumbnails import ThumbnailCache, ThumbnailsBusy
from pipeline.events import OK_STATUSES, RowResult, RowStatus
from pipeline.manifest import TooManyRows, read_manifest
from pipeline.storage import ObjectStore
from pipeline.uri import confine

HERE = Path(__file__).parent
SESSION_COOKIE = "avatar_render_session"
UPLOAD_FORMATS = (".jsonl", ".csv")  # text manifests: their memory is bounded by their bytes
JOBS_PER_PAGE = 50
MAX_REVOKED_SESSIONS = 10_000  # sessions ended by logging out, remembered until they would have expired anyway
ERROR_CHARS = 200  # a row's error in the table: its first line, this long at most (the whole text on hover)
REFRESH_ACTIVE_S = 2  # while a job is queued or running
REFRESH_IDLE_S = 15  # the job list, so that a job submitted elsewhere shows up
THUMBNAIL_RETRY_S = 2  # Retry-After of a thumbnail refused because too many are waiting to be made


class ConsoleRefused(Exception):
    """A console request refused: a page asked for without a session goes to the login form (`login_next`);
    anything else gets `status` and a one-line reason."""

    def __init__(self, status: int, reason: str, login_next: str | None = None):
        self.status, self.reason, self.login_next = status, reason, login_next


def mount_console(
    app: FastAPI, manager: JobManager, history: ThroughputHistory, settings: ServiceSettings
) -> Callable[[], None]:
    """Add the console's routes to `app`; returns what to call when the app stops."""
    router, close = _router(manager, history, settings)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.exception_handler(ConsoleRefused)
    async def refused(request: Request, exc: ConsoleRefused):
        if exc.login_next is not None:
            return RedirectResponse(f"/console/login?next={quote(exc.login_next)}", status_code=303)
        return PlainTextResponse(exc.reason, status_code=exc.status)

    return close


def _router(
    manager: JobManager, history: ThroughputHistory, settings: ServiceSettings
) -> tuple[APIRouter, Callable[[], None]]:
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
        max_waiting=console.thumbnails_waiting,
    )
    token = settings.bearer_token
    # A session cookie is "<issued at>.<nonce>.<signature>", signed with a key derived from the token: changing the
    # token ends every session, and a cookie stops working session_hours after it was issued.
    session_key = hmac.new(token, b"avatar-render console session", hashlib.sha256).digest() if token else b""
    session_s = round(console.session_hours * 3600)
    revoked: dict[str, float] = {}  # cookies ended by logging out -> when they would have expired anyway
    csrf_token = hmac.new(secrets.token_bytes(32), b"avatar-render console form", hashlib.sha256).hexdigest()

    def sign(payload: str) -> str:
        return hmac.new(session_key, payload.encode(), hashlib.sha256).hexdigest()

    def new_session() -> str:
        payload = f"{int(time.time())}.{secrets.token_hex(8)}"
        return f"{payload}.{sign(payload)}"

    def session_expiry(cookie: str) -> float | None:
        """When a session cookie this service issued expires; None if it did not issue it, or it ended."""
        payload, _, signature = cookie.rpartition(".")
        issued = payload.partition(".")[0]
        if not issued.isdigit() or len(issued) > 12:
            return None
        if not hmac.compare_digest(signature.encode(), sign(payload).encode()):
            return None
        expires = int(issued) + session_s
        return expires if time.time() < expires and cookie not in revoked else None

    def signed_in(request: Request) -> bool:
        if token is None or has_bearer_token(request, token):
            return True
        return session_expiry(request.cookies.get(SESSION_COOKIE, "")) is not None

    def require_session(request: Request, *, page: bool = True) -> None:
        """A page (GET) without a session goes to the login form; anything else is a 401."""
        if signed_in(request):
            return
        if page and request.method == "GET":
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise ConsoleRefused(401, "log in", login_next=path)
        raise ConsoleRefused(401, "log in to the console, or send the bearer token")

    def require_same_origin(request: Request) -> None:
        if not is_same_origin(request):
            raise ConsoleRefused(403, "this form was posted from another site")

    async def checked_form(request: Request, *, max_files: int = 0):
        """The form of a console POST: signed in (checked before the body is read) and carrying the CSRF token."""
        require_session(request, page=False)
        require_same_origin(request)
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
        require_same_origin(request)
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
            new_session(),
            max_age=session_s,
            httponly=True,
            samesite="lax",  # sent when a link is followed from elsewhere, never with another site's POST
            secure=console.behind_tls or request.url.scheme == "https",
            path="/console",
        )
        return response

    @router.post("/console/logout")
    async def logout(request: Request):
        await checked_form(request)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        expires = session_expiry(cookie)
        if expires is not None:  # a copy of the cookie stops working too (in this process: a restart forgets)
            now = time.time()
            for ended in [c for c, t in revoked.items() if t <= now]:
                del revoked[ended]
            if len(revoked) >= MAX_REVOKED_SESSIONS:  # the oldest revocation is forgotten first
                del revoked[next(iter(revoked))]
            revoked[cookie] = expires
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/console")
        return response

    @router.get("/console")
    async def jobs(request: Request, offset: int = Query(default=0, ge=0, le=MAX_LIST_OFFSET)):
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
                rows = await _uploaded_rows(upload, settings.max_request_bytes, settings.max_rows_per_job)
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
        request: Request,
        job_id: str,
        status: RowStatus | None = None,
        offset: int = Query(default=0, ge=0, le=MAX_LIST_OFFSET),
    ):
        require_session(request)
        job = manager.status(job_id)
        if job is None:
            return not_found(request, f"no job {job_id!r}")
        rows = manager.rows(job_id) or []
        statuses = sorted({row.status.value for row in rows})
        if status:
            rows = [row for row in rows if row.status == status]
        per_page = console.rows_per_page
        return page(
            request,
            "job.html",
            job=job,
            rows=rows[offset : offset + per_page],
            rows_shown=len(rows),
            offset=offset,
            per_page=per_page,
            status_filter=status.value if status else "",
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
    async def thumbnail(request: Request, job_id: str, row: str):
        require_session(request, page=False)
        found = row_output(job_id, row)
        if found is None:
            return Response(status_code=404)
        try:
            data = await thumbnails.strip(job_id, *found)
        except ThumbnailsBusy:
            return Response(status_code=503, headers={"Retry-After": str(THUMBNAIL_RETRY_S)})
        except (OSError, ValueError):  # the video went missing or cannot be read: no strip, the page stays
            return Response(status_code=404)
        except (BotoCoreError, ClientError):  # the store cannot sign or serve it (credentials, endpoint)
            return Response(status_code=502)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/console/jobs/{job_id}/video")
    def video(request: Request, job_id: str, row: str):
        require_session(request)
        found = row_output(job_id, row)
        if found is None:
            return not_found(request, f"no video for row {row!r} of job {job_id!r}")
        _, uri = found
        if uri.startswith("s3://"):
            try:
                url = store.presigned_url(uri, expires_s=900)
            except (BotoCoreError, ClientError) as err:
                message = f"the object store cannot give a link to this video: {one_line(str(err))}"
                return page(request, "message.html", 502, title="Storage unavailable", message=message, refresh=0)
            return RedirectResponse(url, status_code=307)
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            return not_found(request, f"the video of row {row!r} is gone")
        return FileResponse(path, media_type="video/mp4")

    return router, thumbnails.close


async def _uploaded_rows(upload: UploadFile, max_bytes: int, max_rows: int) -> list[dict]:
    """An uploaded manifest's rows, read by the pipeline's own reader, which stops after `max_rows` (429); a line
    it cannot parse refuses the upload (the person is there to fix it)."""
    ext = os.path.splitext(upload.filename or "")[1].lower()
    if ext not in UPLOAD_FORMATS:
        raise SubmitError(422, "upload", f"upload a {' or '.join(UPLOAD_FORMATS)} manifest (Parquet: give its URI)")
    data = await upload.read(max_bytes + 1)  # the body limit already bounds it; this bounds the read anyway
    if len(data) > max_bytes:
        raise SubmitError(413, "upload", f"manifest over {max_bytes} bytes")
    return await run_in_threadpool(_parse_upload, data, ext, upload.filename, max_rows)


def _parse_upload(data: bytes, ext: str, filename: str, max_rows: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="avatar-upload-") as tmp:
        path = os.path.join(tmp, "manifest" + ext)
        with open(path, "wb") as f:
            f.write(data)

        def reason(err: Exception) -> str:  # named by the uploaded file's name, not the temporary path
            return str(err).replace("file://" + path, filename).replace(path, filename)

        try:
            rows = read_manifest(path, ObjectStore(), max_rows=max_rows)
        except TooManyRows as err:
            raise SubmitError(429, "upload", reason(err)) from None
        except (ValueError, UnicodeDecodeError) as err:
            raise SubmitError(422, "upload", f"cannot read the manifest: {reason(err)}") from None
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
