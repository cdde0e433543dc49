"""`avatar-render submit MANIFEST`: send a job to the HTTP service; with `--wait`, follow it with a progress bar.

Exit status with --wait: 0 when the job succeeded with no failed row, 1 otherwise. Local paths are sent as
absolute paths (the service reads them, so it must see the same filesystem); `s3://` URIs go as they are.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


def register(subparsers) -> None:
    parser = subparsers.add_parser("submit", help="submit a manifest to the HTTP job service")
    parser.add_argument("manifest", help="manifest URI (JSONL, CSV or Parquet; local path, file:// or s3://)")
    parser.add_argument("--output", help="output root URI (default: chosen by the service)")
    parser.add_argument("--actors", type=int, help="render actors for this job")
    parser.add_argument("--force", action="store_true", help="render rows again even if their outputs exist")
    parser.add_argument("--wait", action="store_true", help="follow the job until it ends, with a progress bar")
    parser.add_argument("--url", default=os.environ.get("AVATAR_RENDER_URL", DEFAULT_URL), help="service URL")
    parser.add_argument("--token", default=os.environ.get("AVATAR_RENDER_AUTH_TOKEN"), help="bearer token")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status polls with --wait")
    parser.set_defaults(func=run)


def _uri(value: str) -> str:
    if "://" in value:
        return value
    return "file://" + os.path.abspath(value)


def run(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    body = {"manifest": _uri(args.manifest), "force": args.force}
    if args.output:
        body["output"] = _uri(args.output)
    if args.actors:
        body["actors"] = args.actors
    with httpx.Client(base_url=args.url, headers=headers, timeout=30.0) as client:
        response = client.post("/v1/jobs", json=body)
        if response.status_code >= 400:
            print(f"submit refused ({response.status_code}): {_explain(response)}", file=sys.stderr)
            return 2
        job_id = response.json()["job_id"]
        print(f"job {job_id} submitted to {args.url}", flush=True)
        if not args.wait:
            return 0
        try:
            status = _follow(client, job_id, args.poll)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; job {job_id} continues (cancel: DELETE {args.url}/v1/jobs/{job_id})")
            return 130
    counts = ", ".join(f"{n} {state}" for state, n in sorted(status["counts"].items())) or "no rows"
    print(
        f"job {job_id} {status['state']}: {counts}; {status['video_seconds']:.1f} s of video; output {status['output']}"
    )
    if status.get("error"):
        print(f"error: {status['error']}", file=sys.stderr)
    from pipeline.events import RowStatus

    return 0 if status["state"] == "succeeded" and not status["counts"].get(RowStatus.FAILED) else 1


def _follow(client, job_id: str, poll_seconds: float) -> dict:
    import time

    from tqdm import tqdm

    from pipeline.events import FINAL_STATUSES

    with tqdm(desc=job_id, unit="row") as bar:
        while True:
            response = client.get(f"/v1/jobs/{job_id}")
            response.raise_for_status()
            status = response.json()
            finished = sum(n for state, n in status["counts"].items() if state in FINAL_STATUSES)
            if status["rows_total"] is not None:
                bar.total = status["rows_total"]
            bar.n = finished
            bar.set_postfix(state=status["state"], video_s=f"{status['video_seconds']:.1f}", refresh=False)
            bar.refresh()
            if status["state"] in TERMINAL:
                return status
            time.sleep(poll_seconds)


def _explain(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return f"{body.get('field') or ''}: {body.get('error', body)}".lstrip(": ")
