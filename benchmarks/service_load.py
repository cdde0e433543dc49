"""Load on the HTTP job service: 50 concurrent submitters and 500 status polls a second for 60 s.

    python benchmarks/service_load.py                     # starts a local service (uvicorn) in a subprocess
    python benchmarks/service_load.py --seconds 10        # shorter
    python benchmarks/service_load.py --url http://127.0.0.1:8000 --token T   # an already running service

Submissions mix small valid jobs (one row, 0.5 s of audio) with over-limit ones (too many rows -> 429, a
body over the byte limit -> 413); the service's pending-jobs limit answers the rest with 429. Prints
accepted, rejected (429/413), other 4xx and 5xx counts (5xx must be 0) and status-poll latency p50/p99.
The started service renders its jobs for real (`--no-render` to measure the HTTP layer alone); it is
stopped at the end, so rendering never makes the run unbounded. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

SUBMITTERS = 50
POLLS_PER_SECOND = 500
MAX_POLLS_IN_FLIGHT = 200  # a slow service gets fewer polls, never an unbounded backlog of them
SERVICE_LIMITS = {  # of the started service
    "AVATAR_RENDER_MAX_ROWS_PER_JOB": "20",
    "AVATAR_RENDER_MAX_REQUEST_BYTES": str(64 * 1024),
    "AVATAR_RENDER_MAX_PENDING_JOBS": "100",
}
ROWS_OVER_LIMIT = 50
BYTES_OVER_LIMIT = 128 * 1024
SAMPLE_RATE = 16000
ROW_AUDIO_SECONDS = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_media(directory: Path) -> dict:
    import numpy as np
    from PIL import Image

    from model.media import save_wav

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(directory / "face.png")
    t = np.arange(int(ROW_AUDIO_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    save_wav(directory / "speech.wav", 0.3 * np.sin(2 * np.pi * 180 * t), SAMPLE_RATE)
    return {"portrait": str(directory / "face.png"), "audio": str(directory / "speech.wav")}


def serve(port: int, state_dir: str, render: bool) -> None:
    """The service process (this script re-invoked with --serve-port); SIGTERM stops it cleanly."""
    from cli.commands.serve import connect_ray, run_uvicorn
    from deploy.app import create_app
    from deploy.settings import ServiceSettings

    settings = ServiceSettings(host="127.0.0.1", port=port, state_dir=state_dir)
    if render:
        connect_ray(settings.pipeline)
    app = create_app(settings, run_jobs=render)
    run_uvicorn(app, "127.0.0.1", port, log_level="warning", backlog=4096)


def start_service(workdir: Path, render: bool) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, **SERVICE_LIMITS}
    args = [sys.executable, __file__, "--serve-port", str(port), "--state-dir", str(workdir / "state")]
    process = subprocess.Popen(args + ([] if render else ["--no-render"]), env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the service did not start")


class Tally:
    def __init__(self):
        self.submits: Counter[str] = Counter()
        self.polls: Counter[str] = Counter()
        self.poll_latency: list[float] = []
        self.job_ids: list[str] = []


def classify(code: int) -> str:
    if code < 300:
        return "accepted"
    if code in (413, 429):
        return f"rejected {code}"
    return "5xx" if code >= 500 else f"other {code}"


async def submitter(client, url: str, media: dict, tally: Tally, stop_at: float, rng: random.Random) -> None:
    while time.monotonic() < stop_at:
        kind = rng.random()
        row = {"id": f"r{rng.randrange(10**9)}", **media}
        if kind < 0.1:
            body = {"rows": [dict(row, id=f"r{i}") for i in range(ROWS_OVER_LIMIT)]}
        elif kind < 0.2:
            body = {"rows": [row], "options": {"padding": "x" * BYTES_OVER_LIMIT}}
        else:
            body = {"rows": [row]}
        try:
            async with client.post(
                f"{url}/v1/jobs", data=json.dumps(body), headers={"content-type": "application/json"}
            ) as response:
                tally.submits[classify(response.status)] += 1
                if response.status == 202:
                    tally.job_ids.append((await response.json())["job_id"])
        except Exception as err:  # noqa: BLE001 - a transport error is a result to count, not a crash
            tally.submits[f"error {type(err).__name__}"] += 1


async def poller(client, url: str, tally: Tally, stop_at: float) -> None:
    """POLLS_PER_SECOND status requests on a fixed schedule, each for a random accepted job."""
    in_flight = asyncio.Semaphore(MAX_POLLS_IN_FLIGHT)
    tasks: set[asyncio.Task] = set()

    async def one(job_id: str) -> None:
        async with in_flight:
            started = time.perf_counter()
            try:
                async with client.get(f"{url}/v1/jobs/{job_id}") as response:
                    await response.read()
            except Exception as err:  # noqa: BLE001
                tally.polls[f"error {type(err).__name__}"] += 1
                return
            tally.poll_latency.append(time.perf_counter() - started)
            tally.polls[classify(response.status)] += 1

    interval, next_at = 1.0 / POLLS_PER_SECOND, time.monotonic()
    while next_at < stop_at:
        if tally.job_ids and not in_flight.locked():
            task = asyncio.create_task(one(random.choice(tally.job_ids)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif tally.job_ids:
            tally.polls["skipped (200 in flight)"] += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*tasks)  # the last polls finish after the window; rates count the window only


async def load(url: str, token: str | None, seconds: float, media: dict) -> tuple[Tally, float]:
    # aiohttp (installed with ray[serve]): its client costs far less CPU per request than httpx's, and the
    # load generator shares this machine's cores with the service.
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=SUBMITTERS + MAX_POLLS_IN_FLIGHT)
    timeout = aiohttp.ClientTimeout(total=30)
    tally = Tally()
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as client:
        started = time.monotonic()
        stop_at = started + seconds
        rng = random.Random(0)
        await asyncio.gather(
            poller(client, url, tally, stop_at),
            *(submitter(client, url, media, tally, stop_at, random.Random(rng.random())) for _ in range(SUBMITTERS)),
        )
        return tally, seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load (default 60)")
    parser.add_argument("--url", help="an already running service on loopback (default: start one)")
    parser.add_argument("--token", default=os.environ.get("AVATAR_RENDER_AUTH_TOKEN"))
    parser.add_argument(
        "--no-render",
        dest="render",
        action="store_false",
        help="the started service accepts jobs but renders none (the HTTP layer alone)",
    )
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_port:
        serve(args.serve_port, args.state_dir, args.render)
        return 0

    with tempfile.TemporaryDirectory(prefix="service-load-") as workdir:
        workdir = Path(workdir)
        media = make_media(workdir)
        process = None
        if args.url:
            if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("--url must be a loopback address: this benchmark floods the service")
            url = args.url
        else:
            process, url = start_service(workdir, args.render)
        try:
            tally, elapsed = asyncio.run(load(url, args.token, args.seconds, media))
        finally:
            if process is not None:
                process.terminate()
                process.wait(120)

    polls = sum(n for k, n in tally.polls.items() if not k.startswith("skipped"))
    fivexx = tally.submits["5xx"] + tally.polls["5xx"]
    rendering = "rendering" if (args.url or args.render) else "not rendering"
    print(
        f"\nservice load: {elapsed:.1f} s, {SUBMITTERS} submitters, {POLLS_PER_SECOND} polls/s target, "
        f"service {rendering}"
    )
    print(f"| {'metric':<34} | {'value':>10} |")
    print(f"|{'-' * 36}|{'-' * 12}|")
    rows = [
        ("submissions accepted (202)", tally.submits["accepted"]),
        ("submissions rejected 429", tally.submits["rejected 429"]),
        ("submissions rejected 413", tally.submits["rejected 413"]),
        ("submissions other 4xx", sum(n for k, n in tally.submits.items() if k.startswith("other"))),
        ("submission transport errors", sum(n for k, n in tally.submits.items() if k.startswith("error"))),
        ("status polls answered", polls),
        ("status polls per second", f"{polls / elapsed:.0f}"),
        ("status polls skipped (backlog)", tally.polls["skipped (200 in flight)"]),
        ("5xx responses", fivexx),
        ("status latency p50 (ms)", f"{1000 * percentile(tally.poll_latency, 0.50):.1f}"),
        ("status latency p99 (ms)", f"{1000 * percentile(tally.poll_latency, 0.99):.1f}"),
    ]
    for name, value in rows:
        print(f"| {name:<34} | {value!s:>10} |")
    return 1 if fivexx else 0


if __name__ == "__main__":
    sys.exit(main())
