"""Throughput of one render actor as it keeps N rows in flight (continuous batching), on this machine.

    python benchmarks/actor_batching.py --rows 8 --seconds 4 --batch 1,2,4,8 --out docs/perf/cpu-actor-batching.json

Each N runs in a fresh process (so the peak memory is its own): the render actor's own loop (`BatchRenderer`, what
`RenderActor` wraps for Ray Data) renders `--rows` rows of the bundled model, up to N at once and refilled as rows
finish, the way Ray Data's `max_concurrent_calls_per_actor` feeds it; segments are stored under a temporary
directory. Reported per N: video-seconds rendered per actor-second (and as a ratio to N = 1), the share of the
actor's time spent generating (engine steps; the rest is VAE decode, H.264 encode and storage), and the peak
resident memory. `--overlap on` runs the decode and encode on a second thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def measure(rows: int, seconds: float, batch: int, overlap: str, threads: int) -> dict:
    """One N in this process."""
    import resource

    import numpy as np
    import torch

    from actors.render import BatchRenderer
    from model.generator import AvatarModel
    from model.media import load_audio, load_portrait
    from pipeline.manifest import RowTask
    from pipeline.records import RowRecord, array_to_bytes
    from pipeline.settings import PipelineSettings
    from pipeline.storage import ObjectStore

    torch.set_num_threads(threads)
    model = AvatarModel.load()  # the bundled tiny model
    preset = model.preset
    settings = PipelineSettings(rows_per_actor=batch, overlap_decode=overlap, actor_num_cpus=threads)
    portraits = sorted(EXAMPLES.glob("synth-*.png"))
    speech = [load_audio(p, preset.audio.sample_rate) for p in sorted(EXAMPLES.glob("synth-*.wav"))]
    samples = int(seconds * preset.audio.sample_rate)
    with tempfile.TemporaryDirectory() as out:
        records = []
        for i in range(rows):
            audio = np.resize(speech[i % len(speech)], samples)  # the examples' speech, looped to the length
            portrait = load_portrait(portraits[i % len(portraits)], preset.video.height, preset.video.width)
            task = RowTask(index=i, id=f"row-{i}", segments=f"file://{out}/.segments/row-{i}")
            records.append(RowRecord(task=task, portrait=array_to_bytes(portrait), audio=array_to_bytes(audio)))
        renderer = BatchRenderer(model, ObjectStore(), settings, "bench", "bench-actor", report=lambda events: False)
        done = threading.Semaphore(0)
        results = []

        def resolve(record):
            results.append(record)
            done.release()

        started = time.perf_counter()
        for record in records[:batch]:  # N calls in flight, each refilled as a row finishes
            renderer.submit(record, resolve)
        for record in records[batch:]:
            done.acquire()
            renderer.submit(record, resolve)
        for _ in range(min(batch, rows)):
            done.acquire()
        wall = time.perf_counter() - started
    failed = [r.error for r in results if r.status != "rendered"]
    if failed:
        raise RuntimeError(f"rows failed: {failed}")
    video_seconds = sum(r.result["video_seconds"] for r in results)
    return {
        "rows_per_actor": batch,
        "overlap_decode": overlap,
        "rows": rows,
        "video_seconds": video_seconds,
        "actor_seconds": wall,
        "video_seconds_per_actor_second": video_seconds / wall,
        "generating_share": renderer.step_seconds / wall,
        "most_rows_together": max(r.result["rows_in_batch"] for r in results),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="audio per row")
    p.add_argument("--batch", default="1,2,4,8", help="rows per actor to measure")
    p.add_argument("--overlap", choices=("on", "off"), default="off", help="decode/encode on a second thread")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the actor (its actor_num_cpus)")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one N in this process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.rows, args.seconds, args.one, args.overlap, args.threads)))
        return {}
    runs = []
    for batch in [int(b) for b in args.batch.split(",")]:
        command = [sys.executable, __file__, "--one", str(batch), "--rows", str(args.rows), "--seconds",
                   str(args.seconds), "--overlap", args.overlap, "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"N={batch}: {runs[-1]['video_seconds_per_actor_second']:.3f} video-s per actor-s", file=sys.stderr)
    base = runs[0]["video_seconds_per_actor_second"]
    for run in runs:
        run["ratio_to_first"] = run["video_seconds_per_actor_second"] / base
    result = {"command": "python benchmarks/actor_batching.py " + " ".join(argv or sys.argv[1:]), "runs": runs}
    print(
        "| rows per actor | video-s per actor-s | ratio to N=1 | generating share | most rows together | peak RSS MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['rows_per_actor']} | {r['video_seconds_per_actor_second']:.3f} | {r['ratio_to_first']:.2f} | "
              f"{r['generating_share']:.0%} | {r['most_rows_together']} | {r['peak_rss_mib']:.0f} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
