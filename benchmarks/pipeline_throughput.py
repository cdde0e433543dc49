"""Pipeline throughput on this machine: the same job with 1 and 2 render actors.

    python benchmarks/pipeline_throughput.py [--rows 6] [--seconds 2] [--actors 1 2]

Prints, per pool size: rows per hour, rendered video-seconds per actor-second, and pipeline efficiency
(the share of actor time spent generating blocks rather than waiting for inputs, writers or startup).
"Steady" numbers start at the first row's render and exclude Ray/actor startup (model loading).
The model is the bundled default, `model/weights/tiny`: 128x128 at 25 fps (the random portraits are fitted to it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from actors import job_workers
from model.media import save_wav
from pipeline.events import BlockRendered, RowFinished, RowStarted, RowStatus
from pipeline.job import JobSpec, run_job
from pipeline.settings import PipelineSettings

SAMPLE_RATE = 16000
PORTRAIT_SIZE = 64


def make_rows(folder: str, rows: int, seconds: float) -> list[dict]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    manifest = []
    for i in range(rows):
        portrait, audio = os.path.join(folder, f"face{i}.png"), os.path.join(folder, f"speech{i}.wav")
        Image.fromarray(rng.integers(0, 256, (PORTRAIT_SIZE, PORTRAIT_SIZE, 3), dtype=np.uint8)).save(portrait)
        save_wav(audio, 0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t) + 0.02 * rng.standard_normal(t.size), SAMPLE_RATE)
        manifest.append({"id": f"row{i}", "portrait": portrait, "audio": audio, "seed": i})
    return manifest


def measure(rows: list[dict], actors: int, out: str, segment_blocks: int | None) -> dict:
    events: list[tuple[float, object]] = []
    settings = PipelineSettings(num_actors=actors, segment_blocks=segment_blocks)
    start = time.perf_counter()
    report = run_job(
        JobSpec(job_id=f"bench-{actors}", rows=rows, output=out, force=True),
        settings,
        job_workers(),
        on_event=lambda e: events.append((time.perf_counter(), e)),
    )
    wall = time.perf_counter() - start
    if report.counts.get(RowStatus.SUCCEEDED, 0) != len(rows):
        raise RuntimeError(f"benchmark rows failed: {[r.error for r in report.rows if r.error]}")
    first_start = min(t for t, e in events if isinstance(e, RowStarted))
    last_finish = max(t for t, e in events if isinstance(e, RowFinished))
    steady = last_finish - first_start
    generate = sum(e.generate_seconds for _, e in events if isinstance(e, BlockRendered))
    video = sum(e.video_seconds for _, e in events if isinstance(e, BlockRendered))
    return {
        "actors": actors,
        "rows": len(rows),
        "video_s": video,
        "wall_s": wall,
        "rows_per_hour": len(rows) / wall * 3600,
        "steady_rows_per_hour": len(rows) / steady * 3600,
        "video_s_per_actor_s": video / (actors * steady),
        "efficiency": generate / (actors * steady),
        "efficiency_incl_startup": generate / (actors * wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="audio seconds per row")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--segment-blocks", type=int, default=None, help="K (default: about 4 s of video)")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as folder:
        rows = make_rows(folder, args.rows, args.seconds)
        for actors in args.actors:
            results.append(measure(rows, actors, os.path.join(folder, f"out{actors}"), args.segment_blocks))
    ray.shutdown()

    print(
        f"\npipeline throughput: {args.rows} rows x {args.seconds:g} s audio, the bundled tiny model @ 25 fps, "
        f"K={args.segment_blocks or 'default'}, {os.cpu_count()} CPUs"
    )
    header = ("actors", "wall s", "rows/h", "rows/h steady", "video-s/actor-s", "efficiency", "eff. incl startup")
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for r in results:
        print(
            " | ".join(
                [
                    f"{r['actors']:>6}",
                    f"{r['wall_s']:>6.1f}",
                    f"{r['rows_per_hour']:>6.0f}",
                    f"{r['steady_rows_per_hour']:>13.0f}",
                    f"{r['video_s_per_actor_s']:>15.3f}",
                    f"{r['efficiency']:>10.1%}",
                    f"{r['efficiency_incl_startup']:>17.1%}",
                ]
            )
        )


if __name__ == "__main__":
    main()
