"""The web console (/console): Debian's chromium, headless, driven by Playwright against a running service with
real jobs on a local Ray; and the console's rules without a browser (token, CSRF, submissions validated like
the API's, the bounded throughput history and thumbnail cache).

`make console-screenshots` runs the browser test with CONSOLE_SCREENSHOTS_DIR=docs/img, which copies the
screenshots it takes (always into the test's tmp dir) into docs/img.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_service_jobs import FPS, ServiceThread, free_port

from deploy.app import create_app
from deploy.history import MAX_ACTORS_SHOWN, OTHER_ACTORS, ThroughputHistory
from deploy.settings import ConsoleSettings, ServiceSettings
from deploy.thumbnails import ThumbnailCache
from model.media import load_audio, save_wav
from model.media.video import VideoWriter
from pipeline.events import BlockRendered, RowResult, RowStatus
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOKEN = "console-test-token"
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
    with TestClient(create_app(settings, run_jobs=False)) as c:
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
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path / "state"), run_jobs=False)) as c:
        listing = c.get("/console")
        assert listing.status_code == 200 and "Log out" not in listing.text
        assert c.get("/", follow_redirects=False).headers["location"] == "/console"
        assert c.post("/console/jobs", data={"manifest": "/m.jsonl"}).status_code == 403  # CSRF even here
        assert c.get("/console/jobs/job-nope").status_code == 404
        assert c.get("/console", params={"offset": "9" * 30}).status_code == 422  # not a database error


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
    with TestClient(create_app(settings, run_jobs=False)) as c:
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
    with TestClient(create_app(ServiceSettings(state_dir=tmp_path / "state"), run_jobs=False)) as c:
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
    strip = Image.open(__import__("io").BytesIO(cache.strip("job-1", row, "file://" + str(video))))
    assert strip.format == "JPEG" and strip.size == (96, 32)
    reds = [np.asarray(strip)[:, i * 32 : (i + 1) * 32, 0].mean() for i in range(3)]
    assert reds[0] < 30 and 100 < reds[1] < 160 and reds[2] > 220, reds  # first, middle and last frame
    assert len(list((tmp_path / "thumbs").iterdir())) == 1

    # From S3 (a real HTTP endpoint): ffmpeg reads a presigned URL, seeking instead of downloading everything.
    store = ObjectStore(s3_server)
    store.put_file(f"{s3_bucket}/talk.mp4", video)
    s3_cache = ThumbnailCache(tmp_path / "s3-thumbs", store, height=32, max_bytes=10**6)
    s3_strip = Image.open(__import__("io").BytesIO(s3_cache.strip("job-1", row, f"{s3_bucket}/talk.mp4")))
    assert s3_strip.size == (96, 32)

    # Bounded: with room for about two strips, the least recently used go first.
    one = (tmp_path / "thumbs" / next(iter(os.listdir(tmp_path / "thumbs")))).stat().st_size
    small = ThumbnailCache(tmp_path / "small", ObjectStore(), height=32, max_bytes=int(2.5 * one))
    for job in ("j1", "j2", "j3", "j4"):
        small.strip(job, row, "file://" + str(video))
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
