"""The web console (/console): Debian's chromium, headless, driven by Playwright against a running service with
real jobs on a local Ray; and the console's rules without a browser (token, CSRF, submissions validated like
the API's, the bounded throughput history and thumbnail cache).

`make console-screenshots` runs the browser test with CONSOLE_SCREENSHOTS_DIR=docs/img, which copies the
screenshots it takes (always into the test's tmp dir) into docs/img.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from test_service_jobs import FPS, ServiceThread, free_port

from deploy.app import create_app
from deploy.console import SESSION_COOKIE
from deploy.history import MAX_ACTORS_SHOWN, OTHER_ACTORS, ThroughputHistory
from deploy.settings import ConsoleSettings, ServiceSettings
from deploy.thumbnails import ThumbnailCache
from model.media import load_audio, save_wav
from model.media.video import VideoWriter
from pipeline.events import BlockRendered, RowResult, RowStatus
from pipeline.settings import PipelineSettings, StorageSettings
from pipeline.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOKEN = "console-test-token"
LOCAL = "http://127.0.0.1"  # what a local browser or script calls the service by (a test client's default is refused)
MIB = 1024 * 1024
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags that work on this machine (no GPU, no network, no sandbox as root), and a fresh profile per launch.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 240_000  # bound on every wait for a job in the browser; the renders take seconds
SAMPLE_RATE = 16000


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html)[1]


# -- without a browser ---------------------------------------------------------------------------------------


def test_console_asks_for_the_token_like_the_api(tmp_path):
    settings = ServiceSettings(state_dir=tmp_path / "state", auth_token=TOKEN)
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        # No session: pages go to the login form, everything else is a 401, and no job is submitted.
        page = c.get("/console/jobs/x?status=failed", follow_redirects=False)
        assert (
            page.status_code == 303
            and page.headers["location"] == "/console/login?next=/console/jobs/x%3Fstatus%3Dfailed"
        )
        for path in ("/console/throughput.json", "/console/jobs/x/thumbnail?row=a"):
            assert c.get(path).status_code == 401, path
        assert c.post("/console/jobs", data={"manifest": "/m.jsonl"}).status_code == 401
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).json()["jobs"] == []

        # A wrong token is refused; the right one sets an HttpOnly, SameSite=Lax cookie scoped to /console.
        assert c.post("/console/login", data={"token": "wrong", "next": "/console"}).status_code == 401
        login = c.post("/console/login", data={"token": TOKEN, "next": "https://evil.example/"}, follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/console"  # never off-site
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/console" in cookie
        assert TOKEN not in cookie  # the cookie is derived from the token, not the token
        listing = c.get("/console")
        assert listing.status_code == 200 and "Submit a job" in listing.text

        # Signed in, a form still needs its CSRF token (another site cannot post it).
        assert c.post("/console/jobs", data={"manifest": "/m.jsonl"}).status_code == 403
        assert c.post("/console/jobs", data={"manifest": "/m.jsonl", "csrf": "0" * 64}).status_code == 403
        assert (
            c.post("/console/logout", data={"csrf": csrf_of(listing.text)}, follow_redirects=False).status_code == 303
        )
        c.cookies.clear()
        assert c.get("/console", follow_redirects=False).status_code == 303

        # A script may use the bearer header instead of a session.
        assert c.get("/console/throughput.json", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_console_is_open_on_loopback_without_a_token_but_forms_need_csrf(tmp_path):
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path / "state"), run_jobs=False), base_url=LOCAL) as c:
        listing = c.get("/console")
        assert listing.status_code == 200 and "Log out" not in listing.text
        assert c.get("/", follow_redirects=False).headers["location"] == "/console"
        assert c.post("/console/jobs", data={"manifest": "/m.jsonl"}).status_code == 403  # CSRF even here
        assert c.get("/console/jobs/job-nope").status_code == 404
        assert c.get("/console", params={"offset": "9" * 30}).status_code == 422  # not a database error


def eventually(get, what: str, timeout_s: float = 60):
    """get() once it returns something true, polled until timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := get()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_tokenless_loopback_service_answers_only_to_loopback_host_names(tmp_path):
    """DNS rebinding: a web page whose name is made to resolve to 127.0.0.1 reaches the service from the local
    browser with its own name in the Host header. Without a token the service answers only to localhost,
    127.0.0.1 and [::1] (any port), for the API and the console alike; nothing the page sent is acted on."""
    app = create_app(ServiceSettings(state_dir=tmp_path / "state"), run_jobs=False)
    port = free_port()
    row = {"id": "a", "portrait": "/in/face.png", "audio": "/in/a.wav"}
    with ServiceThread(app, port) as service:
        for host in (
            f"evil.example:{port}",
            "evil.example",
            f"127.0.0.1.nip.io:{port}",
            f"localhost.evil.example:{port}",
        ):
            headers = {"Host": host}
            for method, path in (("GET", "/console"), ("GET", "/v1/jobs"), ("GET", "/healthz"), ("POST", "/v1/jobs")):
                response = httpx.request(method, service.url + path, headers=headers, json={"rows": [row]})
                assert response.status_code == 400, (host, path, response.text)
                assert response.json()["field"] == "host" and repr(host) in response.json()["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(f"{service.url}/console", headers={"Host": host}).status_code == 200, host
        assert httpx.get(f"{service.url}/v1/jobs").json()["jobs"] == []  # the refused POSTs submitted nothing

    # The console's forms also refuse a post a browser says came from another origin (CSRF token or not).
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path / "s2"), run_jobs=False), base_url=LOCAL) as c:
        form = {"csrf": csrf_of(c.get("/console").text), "manifest": "/nowhere/m.jsonl"}
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": "http://127.0.0.1:9"},
            {"Referer": "http://evil.example/night.html"},
        ):
            response = c.post("/console/jobs", data=form, headers=headers)
            assert response.status_code == 403 and "another site" in response.text, headers
        for headers in ({"Origin": "http://127.0.0.1"}, {"Referer": "http://127.0.0.1/console"}, {}):
            assert c.post("/console/jobs", data=form, headers=headers).status_code == 422  # past the checks


def test_with_a_token_the_host_names_are_the_operators_choice(tmp_path):
    # A token already keeps other sites' pages out (they cannot present it): any host name by default ...
    settings = ServiceSettings(state_dir=tmp_path / "a", auth_token=TOKEN)
    with TestClient(create_app(settings, run_jobs=False), base_url="http://render.studio.example") as c:
        assert c.get("/healthz").status_code == 200
    # ... or only the ones AVATAR_RENDER_ALLOWED_HOSTS names.
    allowed = ["render.studio.example", "*.svc.cluster.local"]
    settings = ServiceSettings(state_dir=tmp_path / "b", auth_token=TOKEN, allowed_hosts=allowed)
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        for host, expect in (
            ("127.0.0.1:8000", 400),
            ("render.studio.example:443", 200),
            ("avatar.default.svc.cluster.local:8000", 200),
            ("svc.cluster.local", 400),
            ("render.studio.example.evil.example", 400),
        ):
            assert c.get("/healthz", headers={"Host": host}).status_code == expect, host
    with pytest.raises(ValidationError, match="DNS rebinding"):
        ServiceSettings(state_dir=tmp_path / "c", allowed_hosts=["*"])  # without a token: refused at start


def test_a_console_session_expires_and_logging_out_revokes_it(tmp_path):
    def status_with(c: TestClient, cookie: str) -> int:
        return c.get("/console/throughput.json", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}).status_code

    def log_in(c: TestClient) -> tuple[str, str]:
        response = c.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
        assert response.status_code == 303
        session = c.cookies[SESSION_COOKIE]
        c.cookies.clear()  # each request below names its cookie
        return session, response.headers["set-cookie"]

    settings = ServiceSettings(state_dir=tmp_path / "a", auth_token=TOKEN)
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        session, set_cookie = log_in(c)
        assert f"Max-Age={12 * 3600}" in set_cookie and "Secure" not in set_cookie  # 12 h; plain http
        assert status_with(c, session) == 200
        # The never-expiring cookie of before (a bare HMAC of the token), and this one with its time changed.
        static = hmac.new(TOKEN.encode(), b"avatar-render console session", hashlib.sha256).hexdigest()
        issued, nonce, signature = session.split(".")
        for forged in (static, f"{int(issued) + 3600}.{nonce}.{signature}", f"{issued}.{nonce}.{'0' * 64}"):
            assert status_with(c, forged) == 401, forged
        # Logging out ends the session, not only the browser's copy of it; another session goes on.
        other, _ = log_in(c)
        csrf = csrf_of(c.get("/console", headers={"Cookie": f"{SESSION_COOKIE}={session}"}).text)
        out = c.post("/console/logout", data={"csrf": csrf}, headers={"Cookie": f"{SESSION_COOKIE}={session}"})
        assert out.status_code == 200 and "/console/login" in str(out.url)
        assert status_with(c, session) == 401 and status_with(c, other) == 200

    # Over https, or behind a proxy that terminates TLS, the cookie is Secure.
    settings = ServiceSettings(state_dir=tmp_path / "b", auth_token=TOKEN)
    with TestClient(create_app(settings, run_jobs=False), base_url="https://127.0.0.1") as c:
        assert "Secure" in log_in(c)[1]
    behind_tls = ConsoleSettings(behind_tls=True, session_hours=2 / 3600)
    settings = ServiceSettings(state_dir=tmp_path / "c", auth_token=TOKEN, console=behind_tls)
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        session, set_cookie = log_in(c)
        assert "Secure" in set_cookie and "Max-Age=2" in set_cookie
        # session_hours later (2 s here) the cookie no longer works, whatever the browser keeps.
        started = time.monotonic()
        eventually(lambda: status_with(c, session) == 401, "the session to expire", timeout_s=10)
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "name, manifest",
    [
        ("night.csv", b"id,portrait,audio\n" + b"x\n" * 500_000),  # 1 MB: half a million rows of two bytes
        ("night.jsonl", b"{}\n" * 11 + b"  \n" * 1_000_000),  # 3 MB: 11 rows, then a million blank lines
    ],
)
def test_an_uploaded_manifest_is_read_no_further_than_the_row_limit(tmp_path, name, manifest):
    settings = ServiceSettings(state_dir=tmp_path / "state", max_rows_per_job=10)
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        csrf = csrf_of(c.get("/console").text)
        tracemalloc.start()
        try:
            response = c.post("/console/jobs", data={"csrf": csrf}, files={"upload": (name, manifest)})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert c.get("/v1/jobs").json()["jobs"] == []
    assert response.status_code == 429
    shown = re.search(r'id="submit-error">([^<]*)<', response.text)[1]
    assert shown == f"Refused: upload: {name}: 11 rows or more; at most 10 per job"  # stopped after row 11
    assert peak < 32 * MIB, peak / MIB  # rows as dicts, or a list of every line (68 MiB), would not fit


def test_job_page_links_keep_the_status_filter_url_encoded(tmp_path):
    settings = ServiceSettings(state_dir=tmp_path / "state", console=ConsoleSettings(rows_per_page=1))
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        rows = [{"id": f"r{i}", "portrait": "/in/face.png", "audio": "/in/a.wav"} for i in range(3)]
        job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
        for i in range(3):
            c.app.state.manager.store.put_row(job_id, RowResult(id=f"r{i}", status=RowStatus.FAILED, error="input: x"))
        page = c.get(f"/console/jobs/{job_id}", params={"status": "failed"})
        assert 'href="?status=failed&amp;offset=1">next' in page.text
        unfiltered = c.get(f"/console/jobs/{job_id}").text
        assert 'href="?offset=1">next' in unfiltered  # no empty status=
        assert c.get(f"/console/jobs/{job_id}?offset=1").status_code == 200
        assert c.get(f"/console/jobs/{job_id}", params={"status": "failed&offset=9"}).status_code == 422


def test_video_routes_serve_only_confined_outputs_and_store_errors_are_no_500(
    tmp_path, s3_server, s3_bucket, monkeypatch
):
    """A row's video outside the output roots is not served; an S3 output the service has no credentials for is
    a 502 page (the video link) and a 502 thumbnail."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to ask either
    video = tmp_path / "talk.mp4"
    make_video(video, 1.0)
    ObjectStore(s3_server).put_file(f"{s3_bucket}/renders/talk.mp4", video)  # the video is there
    storage = StorageSettings(endpoint_url=s3_server.endpoint_url, region=s3_server.region)  # no keys
    settings = ServiceSettings(
        state_dir=tmp_path / "state",
        output_roots=[(tmp_path / "out").as_uri(), f"{s3_bucket}/renders"],
        pipeline=PipelineSettings(storage=storage),
    )
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        rows = [{"id": name, "portrait": "/p.png", "audio": "/a.wav"} for name in ("talk", "outside")]
        job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
        for name, output in (("talk", f"{s3_bucket}/renders/talk.mp4"), ("outside", video.as_uri())):
            row = RowResult(id=name, status=RowStatus.SUCCEEDED, output=output, frames=FPS, video_seconds=1.0)
            c.app.state.manager.store.put_row(job_id, row)
        for route in ("video", "thumbnail"):  # a store record naming a file elsewhere: not served
            assert c.get(f"/console/jobs/{job_id}/{route}", params={"row": "outside"}).status_code == 404
        video_page = c.get(f"/console/jobs/{job_id}/video", params={"row": "talk"}, follow_redirects=False)
        assert video_page.status_code == 502 and "credentials" in video_page.text, video_page.text
        assert c.get(f"/console/jobs/{job_id}/thumbnail", params={"row": "talk"}).status_code == 502
        assert c.get(f"/console/jobs/{job_id}").status_code == 200  # the job page itself is fine


class StalledEndpoint:
    """A TCP server that accepts connections and never answers: an object store that hangs."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.listener.accept()[0])
            except OSError:  # closed
                return

    def __enter__(self) -> StalledEndpoint:
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop hanging: connections made so far are closed, new ones refused."""
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)
        for conn in self.accepted:
            conn.close()

    def __exit__(self, *exc) -> None:
        if self.listener.fileno() != -1:
            self.close()


def test_thumbnails_waiting_for_ffmpeg_hold_no_thread_of_the_shared_pool(tmp_path):
    """Strips waiting for one of the two ffmpeg turns await instead of blocking a thread of the pool the sync routes
    (POST /v1/jobs) run in: 45 viewers of videos on a store that hangs do not stop submissions, and viewers past
    CONSOLE__THUMBNAILS_WAITING are told to come back (503, Retry-After)."""
    viewers, waiting = 45, 4  # more viewers than the 40 threads of that pool (anyio's default)
    with StalledEndpoint() as stalled:
        storage = StorageSettings(
            endpoint_url=f"http://127.0.0.1:{stalled.port}", access_key_id="k", secret_access_key="s"
        )
        settings = ServiceSettings(
            state_dir=tmp_path / "state",
            output_roots=[(tmp_path / "out").as_uri(), "s3://stalled/renders"],
            pipeline=PipelineSettings(storage=storage),
            console=ConsoleSettings(thumbnails_waiting=waiting),
        )
        app = create_app(settings, run_jobs=False)
        row = {"id": "a", "portrait": "/in/face.png", "audio": "/in/a.wav"}
        with ServiceThread(app, free_port()) as service, ThreadPoolExecutor(viewers) as pool:
            job_id = httpx.post(f"{service.url}/v1/jobs", json={"rows": [row]}).json()["job_id"]
            output = "s3://stalled/renders/a.mp4"
            app.state.manager.store.put_row(
                job_id, RowResult(id="a", status=RowStatus.SUCCEEDED, output=output, frames=FPS, video_seconds=1.0)
            )
            url = f"{service.url}/console/jobs/{job_id}/thumbnail?row=a"
            answers = [pool.submit(httpx.get, url, timeout=120) for _ in range(viewers)]
            eventually(lambda: len(stalled.accepted) == 2, "two ffmpeg runs to reach the store")
            made = 2 + waiting

            def answered() -> list | None:
                done = [a.result() for a in answers if a.done()]
                return done if len(done) >= viewers - made else None

            refused = eventually(answered, "the viewers past the limit to be answered")
            assert len(refused) == viewers - made
            assert all(r.status_code == 503 and r.headers["retry-after"] == "2" for r in refused)
            # The shared pool is free: a submission is answered while six strips wait on the store.
            assert httpx.post(f"{service.url}/v1/jobs", json={"rows": [row]}, timeout=10).status_code == 202
            stalled.close()  # the store fails now: the six are answered too (no strip: 404), nothing hangs
            rest = [a.result(timeout=60) for a in answers if a.result(timeout=60).status_code != 503]
            assert [r.status_code for r in rest] == [404] * made


def test_console_submissions_are_validated_like_the_api(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    settings = ServiceSettings(
        state_dir=tmp_path / "state",
        input_roots=[str(inputs)],
        max_rows_per_job=2,
        max_request_bytes=4096,
    )
    row = {"id": "a", "portrait": str(inputs / "face.png"), "audio": str(inputs / "speech.wav")}
    outside = {"id": "b", "portrait": str(inputs / "face.png"), "audio": "/etc/passwd"}
    with TestClient(create_app(settings, run_jobs=False), base_url=LOCAL) as c:
        csrf = csrf_of(c.get("/console").text)

        def submit(expect: int, files=None, **fields) -> str:
            response = c.post("/console/jobs", data={"csrf": csrf, **fields}, files=files, follow_redirects=False)
            assert response.status_code == expect, response.text
            if expect == 303:
                return response.headers["location"]
            found = re.search(r'id="submit-error">([^<]*)<', response.text)
            return found[1] if found else response.text

        jsonl = lambda *rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
        assert submit(303, files={"upload": ("night.jsonl", jsonl(row))}).startswith("/console/jobs/job-")
        csv_text = f"id,portrait,audio\nc,{row['portrait']},{row['audio']}\n".encode()
        assert submit(303, files={"upload": ("night.csv", csv_text)}).startswith("/console/jobs/job-")
        # Media outside the input roots, named as the API names it; too many rows; a line that is not JSON.
        assert "rows.0.audio" in submit(422, files={"upload": ("m.jsonl", jsonl(outside))})
        assert "at most 2 per job" in submit(429, files={"upload": ("m.jsonl", jsonl(row, row, row))})
        assert "line 2: not valid JSON" in submit(422, files={"upload": ("m.jsonl", jsonl(row) + b"{oops\n")})
        assert "Parquet" in submit(422, files={"upload": ("m.parquet", b"PAR1")})
        assert "not both" in submit(422, files={"upload": ("m.jsonl", jsonl(row))}, manifest="/m.jsonl")
        assert "not both" in submit(422)
        # A manifest URI outside the input roots; an output outside the output roots.
        assert "manifest" in submit(422, manifest="/etc/manifest.jsonl")
        assert "output" in submit(422, files={"upload": ("m.jsonl", jsonl(row))}, output="/tmp/elsewhere")
        # Over the request limit: refused before the body is parsed.
        big = jsonl(*[{**row, "prompt": "x" * 200}] * 30)
        assert len(big) > settings.max_request_bytes
        assert c.post("/console/jobs", data={"csrf": csrf}, files={"upload": ("m.jsonl", big)}).status_code == 413
        jobs = c.get("/v1/jobs").json()["jobs"]
    assert len(jobs) == 2 and all(job["rows_total"] == 1 for job in jobs)


def test_job_page_shows_each_row_and_escapes_what_a_manifest_wrote(tmp_path):
    hostile = '<script>alert("x")</script>'
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path / "state"), run_jobs=False), base_url=LOCAL) as c:
        rows = [{"id": hostile, "portrait": "/in/face.png", "audio": "/in/a.wav"}]
        job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
        error = f"input: {hostile}: audio file not found\nTraceback (most recent call last): ..."
        c.app.state.manager.store.put_row(
            job_id, RowResult(id=hostile, status=RowStatus.FAILED, error=error, error_kind="input", duration_s=0.25)
        )
        html = c.get(f"/console/jobs/{job_id}").text
        # The thumbnail of a row without a video, and a row that is not in the job, are 404s.
        assert c.get(f"/console/jobs/{job_id}/thumbnail", params={"row": hostile}).status_code == 404
        assert c.get(f"/console/jobs/{job_id}/video", params={"row": "other"}).status_code == 404
    assert hostile not in html and "&lt;script&gt;alert(" in html
    shown = re.search(r'class="error row-error" title="([^"]*)">(.*?)</div>', html, re.S)
    assert "audio file not found" in shown[2] and "Traceback" not in shown[2]  # the error's first line in the table,
    assert "Traceback" in shown[1]  # all of it on hover
    assert "0.2 s" in html and 'data-refresh="2"' in html  # the row's duration; the job is queued: refreshing


def test_job_page_says_when_a_rows_metrics_could_not_be_computed(tmp_path):
    """The writer reports {"error": ...} when a metric fails (the row still succeeds): the page shows why, next to
    the numbers that were computed, instead of an empty quality cell."""
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path / "state"), run_jobs=False), base_url=LOCAL) as c:
        names = ("scored", "unscored", "no-truth")
        rows = [{"id": name, "portrait": "/in/face.png", "audio": "/in/a.wav"} for name in names]
        job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
        store = c.app.state.manager.store
        store.put_row(job_id, RowResult(id="scored", status=RowStatus.SUCCEEDED, metrics={"lipsync_r": 0.81}))
        failed = {"error": "ValueError: no face found in the portrait"}
        store.put_row(job_id, RowResult(id="unscored", status=RowStatus.SUCCEEDED, metrics=failed))
        truthless = {"lipsync_r": 0.8, "truth_video_error": "InputError: /in/t.mp4: truth video file not found"}
        store.put_row(job_id, RowResult(id="no-truth", status=RowStatus.SUCCEEDED, metrics=truthless))
        html = c.get(f"/console/jobs/{job_id}").text
    cells = dict(re.findall(r'data-row="([^"]+)">.*?<td class="metrics">(.*?)</td>', html, re.S))
    assert "lipsync_r" in cells["scored"] and "not computed" not in cells["scored"]
    assert "metrics not computed: ValueError: no face found in the portrait" in cells["unscored"]
    # A truth video that could not be scored says so beside the numbers that were.
    assert (
        "lipsync_r" in cells["no-truth"]
        and "no PSNR against the truth video: InputError: /in/t.mp4" in cells["no-truth"]
    )


def test_throughput_history_is_bounded_and_per_actor():
    now = [1000.0]
    history = ThroughputHistory(interval_s=10, keep_s=60, clock=lambda: now[0])
    history.watch_queue(lambda: {"queued": 2, "running": 1}, lambda: 7)

    def block(actor: str, frames: int) -> BlockRendered:
        return BlockRendered("job", "row", actor, 0, frames, frames / FPS, 0.1)

    for _ in range(10):
        now[0] += 10
        for a in range(MAX_ACTORS_SHOWN + 2):
            history.observe(block(f"actor-{a}", 10 * (a + 1)))
        history.tick()
    series = history.series()
    assert len(series["t"]) == 6  # 60 s of 10 s intervals: the oldest fell out
    frames = series["frames_per_s"]
    # Each interval: actor a rendered 10 (a + 1) frames in 10 s.
    assert frames["total"][-1] == pytest.approx(sum(a + 1 for a in range(MAX_ACTORS_SHOWN + 2)))
    shown = [a for a in frames["actors"] if a != OTHER_ACTORS]
    assert len(shown) == MAX_ACTORS_SHOWN and "actor-0" not in shown and "actor-9" in shown  # the busiest
    assert frames["actors"][OTHER_ACTORS][-1] == pytest.approx(1 + 2)  # actors 0 and 1
    assert series["video_seconds_per_s"]["actors"]["actor-9"][-1] == pytest.approx(100 / FPS / 10)
    assert series["queue_rows"][-1] == 7 and series["jobs_running"][-1] == 1 and series["jobs_queued"][-1] == 2
    now[0] += 5
    history.tick()  # a short interval: its rate is over its own length
    assert history.series(hours=3 / 3600)["t"] == [now[0]]
    assert history.series()["frames_per_s"]["total"][-1] == 0


def make_video(path: Path, seconds: float, size: int = 64) -> None:
    frames = np.zeros((int(seconds * FPS), size, size, 3), dtype=np.uint8)
    frames[..., 0] = np.linspace(0, 255, len(frames), dtype=np.uint8)[:, None, None]  # red ramps up over time
    with VideoWriter(path, fps=FPS, width=size, height=size) as writer:
        writer.write(frames)


def test_thumbnail_strips_show_first_middle_last_and_the_cache_stays_bounded(tmp_path, s3_server, s3_bucket):
    video = tmp_path / "talk.mp4"
    make_video(video, 2.0)
    row = RowResult(id="talk", status=RowStatus.SUCCEEDED, output=video.as_uri(), frames=50, video_seconds=2.0)
    cache = ThumbnailCache(tmp_path / "thumbs", ObjectStore(), height=32, max_bytes=10**6)
    strip = Image.open(io.BytesIO(asyncio.run(cache.strip("job-1", row, "file://" + str(video)))))
    assert strip.format == "JPEG" and strip.size == (96, 32)
    reds = [np.asarray(strip)[:, i * 32 : (i + 1) * 32, 0].mean() for i in range(3)]
    assert reds[0] < 30 and 100 < reds[1] < 160 and reds[2] > 220, reds  # first, middle and last frame
    assert len(list((tmp_path / "thumbs").iterdir())) == 1

    # From S3 (a real HTTP endpoint): ffmpeg reads a presigned URL, seeking instead of downloading everything.
    store = ObjectStore(s3_server)
    store.put_file(f"{s3_bucket}/talk.mp4", video)
    s3_cache = ThumbnailCache(tmp_path / "s3-thumbs", store, height=32, max_bytes=10**6)
    s3_strip = Image.open(io.BytesIO(s3_cache.strip_sync("job-1", row, f"{s3_bucket}/talk.mp4")))
    assert s3_strip.size == (96, 32)

    # Bounded: with room for about two strips, the least recently used go first.
    one = (tmp_path / "thumbs" / next(iter(os.listdir(tmp_path / "thumbs")))).stat().st_size
    small = ThumbnailCache(tmp_path / "small", ObjectStore(), height=32, max_bytes=int(2.5 * one))
    for job in ("j1", "j2", "j3", "j4"):
        small.strip_sync(job, row, "file://" + str(video))
    assert small.size_bytes() <= 2.5 * one and len(os.listdir(tmp_path / "small")) == 2


# -- in a real browser ---------------------------------------------------------------------------------------


def example_inputs(directory: Path) -> dict:
    """A short row (the bundled synth-0 example's first 2 s) and a long one (synth-1's speech repeated to 20 s)."""
    directory.mkdir(parents=True)
    for name in ("synth-0.png", "synth-1.png"):
        shutil.copy(EXAMPLES / name, directory / name)
    save_wav(directory / "short.wav", load_audio(EXAMPLES / "synth-0.wav", SAMPLE_RATE)[: 2 * SAMPLE_RATE], SAMPLE_RATE)
    save_wav(directory / "long.wav", np.tile(load_audio(EXAMPLES / "synth-1.wav", SAMPLE_RATE), 5), SAMPLE_RATE)
    return {
        "short": {"id": "synth-0", "portrait": str(directory / "synth-0.png"), "audio": str(directory / "short.wav")},
        "long": {"id": "long-read", "portrait": str(directory / "synth-1.png"), "audio": str(directory / "long.wav")},
        "missing": {
            "id": "no-speech",
            "portrait": str(directory / "synth-0.png"),
            "audio": str(directory / "gone.wav"),
        },
    }


class Screenshots:
    """Full-page screenshots into the test's tmp dir, and into CONSOLE_SCREENSHOTS_DIR (docs/img) when set."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.publish = os.environ.get("CONSOLE_SCREENSHOTS_DIR")
        self.taken: list[Path] = []

    def take(self, page, name: str) -> None:
        path = self.directory / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        if self.publish:
            shutil.copy(path, Path(self.publish) / path.name)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make system-deps)")
def test_console_in_a_real_browser(ray_cluster, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    rows = example_inputs(tmp_path / "inputs")
    night = tmp_path / "night.jsonl"
    night.write_text("".join(json.dumps(rows[name]) + "\n" for name in ("short", "missing")))
    settings = ServiceSettings(
        state_dir=tmp_path / "state",
        auth_token=TOKEN,  # optional on loopback; set, so the login is part of the test
        pipeline=PipelineSettings(segment_blocks=1, num_actors=1),
        console=ConsoleSettings(throughput_interval_s=0.5),
    )
    shots = Screenshots(tmp_path / "screenshots")
    shots.directory.mkdir()
    with (
        ServiceThread(create_app(settings), free_port()) as service,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1360, "height": 860})
        expect.set_options(timeout=WAIT_MS)
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))

        # The token rule: the console asks for it first.
        page.goto(f"{service.url}/console")
        assert page.url.startswith(f"{service.url}/console/login")
        shots.take(page, "console_login")
        page.fill("input[name=token]", TOKEN)
        page.click("form[action='/console/login'] button")
        expect(page.locator("#submit-form")).to_be_visible()

        # Submit a manifest by URI: one good row and one whose speech does not exist.
        page.fill("input[name=manifest]", str(night))
        page.click("#submit-form button[type=submit]")
        expect(page.locator("#summary h1")).to_contain_text("job-")
        job_url = page.url
        # The page refreshes by itself until the job ends: progress reaches 100%.
        expect(page.locator("#summary .progress-text")).to_have_text("100%")
        expect(page.locator("#summary .state")).to_have_text("succeeded")
        assert page.evaluate("document.body.dataset.refresh") == ""  # nothing runs: it stopped refreshing

        failed = page.locator(".row.status-failed")
        expect(failed.locator(".row-id")).to_have_text("no-speech")
        expect(failed.locator(".row-error")).to_contain_text("gone.wav")
        good = page.locator(".row.status-succeeded")
        expect(good.locator("td.num").first).to_have_text(f"{2 * FPS}")  # frames: 2 s of speech
        expect(good.locator(".metrics")).to_contain_text("lipsync_r")
        strip = good.locator("td.strip img")
        strip.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=strip.element_handle())
        width, height = strip.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert (width, height) == (3 * settings.console.thumbnail_height, settings.console.thumbnail_height)
        video = page.request.get(service.url + good.locator("a.video").get_attribute("href"))
        assert video.status == 200 and video.headers["content-type"] == "video/mp4"
        assert video.body()[4:8] == b"ftyp"  # an mp4
        shots.take(page, "console_job")

        # Upload a manifest with a long row, watch it run, cancel it.
        page.goto(f"{service.url}/console")
        upload = tmp_path / "long.jsonl"
        upload.write_text(json.dumps(rows["long"]) + "\n")
        page.set_input_files("input[name=upload]", str(upload))
        page.click("#submit-form button[type=submit]")
        expect(page.locator(".row.status-running .row-id")).to_have_text("long-read")
        page.wait_for_function(  # blocks rendered: the frame counter moves while the row runs
            "() => parseInt(document.querySelector('.row.status-running td.num').textContent.replace(/,/g, '')) > 0"
        )
        shots.take(page, "console_job_running")
        page.click("#cancel")
        expect(page.locator("#summary .state")).to_have_text("cancelled")
        expect(page.locator(".row .row-id")).to_have_text("long-read")
        expect(page.locator(".row .state")).to_have_text("cancelled")

        # The job list: both jobs, and the charts drawn from the throughput the service recorded.
        page.goto(f"{service.url}/console")
        jobs = page.locator("tr.job")
        expect(jobs).to_have_count(2)
        expect(jobs.nth(0).locator(".state")).to_have_text("cancelled")
        expect(jobs.nth(1).locator(".state")).to_have_text("succeeded")
        expect(jobs.nth(1).locator(".progress-text")).to_have_text("100%")
        expect(page.locator(".chart canvas")).to_have_count(3)
        peak = page.evaluate(
            "Math.max(...JSON.parse(document.getElementById('throughput-data').textContent).frames_per_s.total)"
        )
        assert peak > 0
        shots.take(page, "console_jobs")

        browser.close()
    assert errors == []
    assert all(url.startswith(service.url) for url in requests), [u for u in requests if not u.startswith(service.url)]
    assert job_url.startswith(f"{service.url}/console/jobs/job-")
    assert all(path.stat().st_size > 10_000 for path in shots.taken)
