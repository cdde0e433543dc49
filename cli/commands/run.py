"""`avatar-render run MANIFEST --output URI`: render every row of a manifest on Ray, with a progress bar.

Exit code 0 when every row succeeded or was skipped (its output already existed), 1 otherwise.
Ctrl-C cancels the job: rows in flight stop at the next block and keep their segments for a later run.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="render a job manifest (JSONL, CSV or Parquet) into object storage")
    p.add_argument("manifest", help="manifest URI: a local path, file:// or s3://")
    p.add_argument("--output", required=True, help="output root URI: videos, report.parquet and report.jsonl")
    p.add_argument("--actors", type=int, help="render actors (default: AVATAR_RENDER_NUM_ACTORS or 1)")
    p.add_argument(
        "--rows-per-actor",
        type=int,
        help="rows each actor renders together (default: AVATAR_RENDER_ROWS_PER_ACTOR or 1)",
    )
    p.add_argument("--force", action="store_true", help="re-render rows whose output already exists")
    p.add_argument("--job-id", help="job id (default: derived from the time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    from tqdm import tqdm

    from actors import job_workers
    from model.eval.evaluate import truth_psnr_line
    from pipeline.events import OK_STATUSES, BlockRendered, RowFinished
    from pipeline.job import JobSpec, run_job
    from pipeline.settings import PipelineSettings

    spec = JobSpec(
        job_id=args.job_id or time.strftime("run-%Y%m%d-%H%M%S"),
        manifest=args.manifest,
        output=args.output,
        actors=args.actors,
        force=args.force,
        options={"rows_per_actor": args.rows_per_actor} if args.rows_per_actor else {},
    )
    rows = tqdm(desc="rows", unit="row", total=_count_rows(spec.manifest), file=sys.stderr, dynamic_ncols=True)
    video_seconds = 0.0

    def on_event(event) -> None:
        nonlocal video_seconds
        if isinstance(event, BlockRendered):
            video_seconds += event.video_seconds
            rows.set_postfix_str(f"{video_seconds:.1f} video-s rendered", refresh=True)
        elif isinstance(event, RowFinished):
            rows.update(1)

    cancel = threading.Event()
    previous_handler = signal.signal(signal.SIGINT, lambda *_: cancel.set())  # Ctrl-C: stop at the next block
    try:
        report = run_job(spec, PipelineSettings(), job_workers(), on_event=on_event, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        rows.close()

    for row in report.rows:
        if row.status not in OK_STATUSES:
            print(f"{row.status}: {row.id}: {row.error}", file=sys.stderr)
        if "truth_psnr" in row.metrics:  # always beside the still portrait's: the baseline of not animating
            print(f"{row.id}: {truth_psnr_line(row.metrics)}")
        elif "truth_video_error" in row.metrics:
            print(f"{row.id}: no PSNR against its truth video: {row.metrics['truth_video_error']}", file=sys.stderr)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(report.counts.items()))
    print(f"{len(report.rows)} rows: {summary}; report at {spec.output.rstrip('/')}/report.jsonl")
    return 0 if all(row.status in OK_STATUSES for row in report.rows) else 1


def _count_rows(manifest: str) -> int | None:
    """Rows in the manifest, for the bar's total (None if unreadable: run_job reports why)."""
    from pipeline.manifest import read_manifest
    from pipeline.settings import PipelineSettings
    from pipeline.storage import ObjectStore

    try:
        return len(read_manifest(manifest, ObjectStore(PipelineSettings().storage)))
    except Exception:
        return None
