"""One row to one mp4: portrait + speech -> generator -> H.264/AAC file, streamed block by block.

The audio is fed to the session in chunks and blocks are pulled as soon as their audio has arrived, as a live
stream would drive it; every block's frames go straight into ffmpeg, so nothing of the video is held in memory.
(The decoded speech itself, 16 kHz float32 = 3.8 MB a minute, is kept: the generator's state includes it.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from model.generator import AvatarModel, RenderSettings
from model.media import VideoWriter, load_audio, load_portrait

FEED_CHUNK_SECONDS = 1.0  # audio handed to the session at a time: about two blocks of the tiny preset

# progress(frames_written, total_frames), called after every block.
Progress = Callable[[int, int], None]


def render_to_mp4(
    model: AvatarModel,
    portrait_path: str | os.PathLike,
    audio_path: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: RenderSettings | None = None,
    progress: Progress | None = None,
    prompt: str | None = None,
) -> dict:
    """Render one talking-avatar video; return {"frames", "seconds", "blocks", "fps", "timings"}.

    Bad inputs raise `model.errors.InputError` naming the file before any output is created. The mp4 (H.264
    yuv420p, AAC) appears at `out_path` only when complete; its duration equals the audio's within one frame.
    `timings` (wall seconds): "inputs" (decode portrait and audio, encode the reference), "generate" (the
    session: audio features, DiT, VAE decode), "encode" (piping frames to ffmpeg and muxing the audio).
    """
    settings = settings or RenderSettings()
    video = model.preset.video
    height, width = settings.height or video.height, settings.width or video.width
    sample_rate = model.preset.audio.sample_rate
    timings = {"inputs": 0.0, "generate": 0.0, "encode": 0.0}

    started = time.perf_counter()
    portrait = load_portrait(portrait_path, height, width, video.portrait_fit)
    samples = load_audio(audio_path, sample_rate)
    session = model.open(portrait, prompt, settings)
    total_frames = -(-samples.size * video.fps // sample_rate)  # what the session will produce: ceil
    timings["inputs"] = time.perf_counter() - started

    chunk = int(FEED_CHUNK_SECONDS * sample_rate)
    blocks = 0
    # The writer measures nothing itself: the decoded length is the duration the generator renders to.
    with VideoWriter(
        out_path, video.fps, width, height, audio_path=audio_path, audio_duration=samples.size / sample_rate
    ) as writer:
        for start in range(0, samples.size, chunk):
            t = time.perf_counter()
            session.feed_audio(samples[start : start + chunk], final=start + chunk >= samples.size)
            timings["generate"] += time.perf_counter() - t
            while True:
                t = time.perf_counter()
                block = session.next_block()
                timings["generate"] += time.perf_counter() - t
                if block is None:
                    break
                t = time.perf_counter()
                writer.write(block.frames)
                timings["encode"] += time.perf_counter() - t
                blocks += 1
                if progress is not None:
                    progress(writer.frames_written, total_frames)
        t = time.perf_counter()
        writer.close()  # flush the encoder and mux the audio; the context manager's close is then a no-op
        timings["encode"] += time.perf_counter() - t
    frames = writer.frames_written
    return {
        "frames": frames,
        "seconds": frames / video.fps,
        "blocks": blocks,
        "fps": video.fps,
        "out_path": str(Path(out_path)),
        "timings": timings,
    }
