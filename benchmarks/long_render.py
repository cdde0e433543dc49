"""Long render with the `tiny` preset: constant time and memory per block, and where the time goes.

    python benchmarks/long_render.py --minutes 10

Renders N minutes of speech-like audio (SynthTalk formant speech) to an mp4 through `model.render.render_to_mp4`,
the same path as `avatar-render render-one`. Timers wrap the generator's parts from outside (the generator is not
edited): DiT denoise passes, cache-write passes (MCI context and URCR re-writes), VAE decode, audio features,
audio feeding, and encoding (frames piped to ffmpeg, final mux; ffmpeg's own CPU time is reported separately since
the encoder runs in a child process alongside the generator). Per-block wall time (block end to block end,
everything included) and resident memory are compared between the first and the last minute.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from skimage.data import astronaut

from model import engine
from model.generator import AvatarModel, RenderSession, RenderSettings
from model.media import VideoWriter, probe, save_wav
from model.render import render_to_mp4
from model.synth.speech import formant_speech
from model.vae import StreamingDecoder

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM), so the peak measured covers the render alone (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of a process (not the lifetime peak that getrusage reports)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class Probe:
    """Wall-time accumulators per part, and one record per finished block."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.blocks: list[dict] = []  # {"first_frame", "frames", "seconds", "rss", "encoder_rss"}
        self.encoder_pid: int | None = None
        self.session: RenderSession | None = None
        self._last_block_end: float | None = None

    def timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self.calls[part] += 1

        return wrapper

    def block_done(self, block) -> None:
        now = time.perf_counter()
        encoder_rss = 0
        if self.encoder_pid is not None:
            with contextlib.suppress(OSError):
                encoder_rss = rss_bytes(self.encoder_pid)
        self.blocks.append(
            {
                "first_frame": block.first_frame,
                "frames": len(block.frames),
                "seconds": now - self._last_block_end,
                "rss": rss_bytes(),
                "encoder_rss": encoder_rss,
            }
        )
        self._last_block_end = now

    def start(self) -> None:
        self._last_block_end = time.perf_counter()


@contextlib.contextmanager
def instrumented(probe_: Probe, model: AvatarModel):
    """Wrap the parts of a render with timers; restore everything on exit."""
    patches = []

    def patch(owner, name, new):
        patches.append((owner, name, owner.__dict__.get(name), name in owner.__dict__))
        setattr(owner, name, new)

    forward_passes = engine.forward_passes  # every DiT pass of a render goes through it (engine.run_block)

    def timed_forward_passes(dit, passes):
        part = "DiT cache writes" if passes[0].write else "DiT denoise passes"
        return probe_.timed(part, forward_passes)(dit, passes)

    next_block = RenderSession.next_block

    def recorded_next_block(self):
        probe_.session = self
        block = next_block(self)
        if block is not None:
            probe_.block_done(block)
        return block

    write = VideoWriter.write

    def encoder_write(self, frames):
        probe_.encoder_pid = self._proc.pid if self._proc is not None else None
        return probe_.timed("encoding (pipe + mux)", write)(self, frames)

    patch(engine, "forward_passes", timed_forward_passes)
    patch(RenderSession, "next_block", recorded_next_block)
    patch(RenderSession, "feed_audio", probe_.timed("audio feeding", RenderSession.feed_audio))
    patch(StreamingDecoder, "decode_block", probe_.timed("VAE decode", StreamingDecoder.decode_block))
    patch(VideoWriter, "write", encoder_write)
    patch(VideoWriter, "close", probe_.timed("encoding (pipe + mux)", VideoWriter.close))
    patch(model.featurizer, "block_features", probe_.timed("audio features", model.featurizer.block_features))
    try:
        yield
    finally:
        for owner, name, old, had in reversed(patches):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)


def minute_summary(blocks: list[dict], fps: int, first_frame: int, last_frame: int) -> dict:
    sel = [b for b in blocks if first_frame <= b["first_frame"] < last_frame]
    per_block = [b["seconds"] * 1000 for b in sel]
    return {
        "blocks": len(sel),
        "frames": sum(b["frames"] for b in sel),
        "ms_mean": statistics.fmean(per_block),
        "ms_median": statistics.median(per_block),
        "ms_max": max(per_block),
        "rss_max": max(b["rss"] for b in sel) / MIB,
        "rss_min": min(b["rss"] for b in sel) / MIB,
        "encoder_rss_max": max(b["encoder_rss"] for b in sel) / MIB,
        "fps": sum(b["frames"] for b in sel) / sum(b["seconds"] for b in sel),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", help="keep the mp4 here (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = AvatarModel.load(preset="tiny")
    fps, gen = model.preset.video.fps, model.preset.generator
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        speech = formant_speech(args.seed, args.minutes * 60)
        save_wav(tmp / "speech.wav", speech.samples, speech.sample_rate)
        del speech  # the render decodes the file itself, as it would any user's audio
        Image.fromarray(astronaut()).save(tmp / "portrait.png")  # a real photo shipped with scikit-image
        out = Path(args.out) if args.out else tmp / "long.mp4"

        probe_ = Probe()
        peak_reset = reset_peak_rss()  # the synthesis above is the benchmark's, not the render's
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with instrumented(probe_, model):
            started = time.perf_counter()
            probe_.start()
            result = render_to_mp4(model, tmp / "portrait.png", tmp / "speech.wav", out, RenderSettings(seed=args.seed))
            wall = time.perf_counter() - started
        peak_rss = peak_rss_bytes()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        encoder_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
        info = probe(out)

    frames = result["frames"]
    minute = 60 * fps
    print(
        f"# long_render: tiny preset ({model.description}), {args.minutes:g} min of formant speech, "
        f"seed {args.seed}, torch threads {args.threads}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# plan {gen.step_plan}, {gen.frames_per_block} latent frames/block, t_mci {gen.t_mci}, "
        f"window {gen.window_frames}, horizon {gen.horizon_frames}, cache resets {probe_.session.cache.resets}"
    )
    print(
        f"# output: {frames} frames, {result['blocks']} blocks, mp4 {info['frames']} frames, "
        f"duration {info['duration']:.3f} s vs audio {info['audio_duration']:.3f} s"
    )
    print()
    print("| span | blocks | frames | ms/block mean | median | max | video fps | RSS MiB (min-max) | ffmpeg RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    spans = [("first minute", 0, min(minute, frames))]
    if frames > minute:
        spans.append(("last minute", max(frames - minute, minute), frames))
    for name, lo, hi in spans:
        s = minute_summary(probe_.blocks, fps, lo, hi)
        print(
            f"| {name} | {s['blocks']} | {s['frames']} | {s['ms_mean']:.0f} | {s['ms_median']:.0f} | "
            f"{s['ms_max']:.0f} | {s['fps']:.1f} | {s['rss_min']:.0f}-{s['rss_max']:.0f} | "
            f"{s['encoder_rss_max']:.0f} |"
        )
    since = "during the render" if peak_reset else "of the whole process, speech synthesis included"
    print(f"\npeak RSS {since} (VmHWM): {peak_rss / MIB:.0f} MiB")
    print(
        f"\nreal-time factor: {frames / wall:.1f} video frames per wall second (target {fps}), "
        f"{frames / fps / wall:.2f}x real time, wall {wall:.1f} s\n"
    )
    print("| part | wall s | % of wall | ms/block | calls |")
    print("|---|---|---|---|---|")
    blocks = max(1, result["blocks"])
    accounted = 0.0
    for part in (
        "DiT denoise passes",
        "DiT cache writes",
        "VAE decode",
        "audio features",
        "audio feeding",
        "encoding (pipe + mux)",
    ):
        sec = probe_.seconds[part]
        accounted += sec
        print(f"| {part} | {sec:.1f} | {100 * sec / wall:.1f} | {1000 * sec / blocks:.1f} | {probe_.calls[part]} |")
    other = wall - accounted
    print(
        f"| other (inputs, sampler arithmetic, RNG, bookkeeping) | {other:.1f} | {100 * other / wall:.1f} | "
        f"{1000 * other / blocks:.1f} | |"
    )
    print(
        f"| (ffmpeg encoder CPU, child process, overlaps the above) | {encoder_cpu:.1f} | "
        f"{100 * encoder_cpu / wall:.1f} | {1000 * encoder_cpu / blocks:.1f} | |"
    )


if __name__ == "__main__":
    main()
