"""Score a rendered video against its inputs (portrait, audio, the truth file's phones) and a ground-truth video.

The metrics read only what a renderer was given and what it produced, except the PSNR against a ground-truth video
(a recorded take of the same speech), computed only when one is given and always printed next to the still
portrait's PSNR against the same frames: the honest baseline, a video that does not animate at all.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from typing import Literal

import numpy as np

from model.errors import InputError
from model.eval import metrics
from model.eval.mouth import locate_mouth, mouth_opening

MouthMethod = Literal["auto", "synth", "facemesh"]
WINDOW_SECONDS = 30.0
SAMPLE_RATE = 16000
# At or below this size the report reads the mouth from pixels: SynthTalk's examples are 128x128, and the face mesh
# (which finds small real faces once upscaled) costs minutes a row on a busy CPU. A real photo this small is read
# with SynthTalk's locator too: the held-out photo evaluation asks for the mesh explicitly.
_SMALL_PORTRAIT = 128
METRICS = ("lipsync_r", "av_offset_frames", "identity_error", "portrait_psnr", "boundary_jitter")
# Against a ground-truth video: the render's PSNR over the frames both have and at frame 0, and the still portrait's.
TRUTH_VIDEO_METRICS = ("truth_psnr", "still_truth_psnr", "truth_psnr_frame0", "still_truth_psnr_frame0")


def _pick_method(method: MouthMethod, portrait: np.ndarray, has_truth: bool) -> str:
    if method != "auto":
        return method
    if has_truth or max(portrait.shape[:2]) <= _SMALL_PORTRAIT:
        return "synth"  # a truth file only exists for SynthTalk clips
    from model.eval.facemesh import FaceMesh

    with FaceMesh() as mesh:
        return "facemesh" if mesh.landmarks(portrait) is not None else "synth"


class _Series:
    """The per-frame series every metric is computed from, accumulated chunk by chunk, so a video is scored
    without ever being held whole: mouth opening, identity error outside the mouth, and the change between
    consecutive frames (the last frame of a chunk is kept for the next chunk's first pair)."""

    def __init__(self, portrait: np.ndarray, method: str, source: str, faceless: str = "error"):
        height, width = portrait.shape[:2]
        self.portrait, self.method, self.source, self.faceless = portrait, method, source, faceless
        self.tracker = None  # the face mesh, for method "facemesh"
        if method == "synth":
            self.region = locate_mouth(portrait, source)
            self.mouth_mask = self.region.mask(height, width)
        elif method == "facemesh":
            from model.eval.facemesh import OpeningTracker, facemesh_mouth_box

            rows, cols = facemesh_mouth_box(portrait, source)
            self.mouth_mask = np.zeros((height, width), dtype=bool)
            self.mouth_mask[rows, cols] = True
            self.tracker = OpeningTracker()
        else:
            raise ValueError(f"mouth method must be auto, synth or facemesh, got {method!r}")
        self.opening: list[np.ndarray] = []
        self.identity: list[np.ndarray] = []
        self.portrait_errors: list[np.ndarray] = []  # squared error per frame, outside the mouth
        self.changes: list[np.ndarray] = []
        self.last: np.ndarray | None = None

    def add(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[1:] != self.portrait.shape:
            raise InputError(self.source, f"portrait is {self.portrait.shape}, video frames are {frames.shape[1:]}")
        if self.tracker is not None:
            self.opening.append(self.tracker.update(frames))
        else:
            self.opening.append(mouth_opening(frames, self.region))
        self.identity.append(metrics.identity_errors(frames, self.portrait, self.mouth_mask))
        self.portrait_errors.append(metrics.squared_errors(frames, self.portrait, ~self.mouth_mask))
        if self.last is not None:  # the pair across the chunk boundary
            self.changes.append(metrics.frame_changes(np.stack([self.last, frames[0]])))
        self.changes.append(metrics.frame_changes(frames))
        self.last = frames[-1].copy()  # not a view: the chunk itself can go

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(opening, identity, portrait errors, changes) over every frame added."""
        opening, identity, portrait_errors, changes = (
            np.concatenate(parts) if parts else np.zeros(0)
            for parts in (self.opening, self.identity, self.portrait_errors, self.changes)
        )
        if self.tracker is not None:
            from model.eval.facemesh import fill_missing

            opening = fill_missing(opening)
            if len(opening) and np.isnan(opening).all():
                if self.faceless != "closed":
                    raise InputError(self.source, "no face found by the face mesh in any frame")
                opening = np.zeros(len(opening))  # no face, no mouth movement: lip-sync 0
        return opening, identity, portrait_errors, changes

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def score(
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    portrait: np.ndarray,
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    phones: list | None = None,
    block_frames: int = metrics.BLOCK_FRAMES,
    first_block_frames: int = metrics.FIRST_BLOCK_FRAMES,
    mouth: MouthMethod = "auto",
    window_seconds: float = WINDOW_SECONDS,
    source: str = "portrait",
    faceless: Literal["error", "closed"] = "error",
) -> dict:
    """All metrics for frames uint8 (N, H, W, 3), or an iterable of such chunks (a `stream_video`), and a
    portrait uint8 (H, W, 3) of the same size. The numbers do not depend on how the frames are chunked.

    `phones` (list of PhoneTiming) gives the lip-sync reference; without it the speech envelope does.
    `faceless`: when the face mesh finds no face in any frame, raise an InputError ("error") or score the mouth as
    closed throughout ("closed": lip-sync 0), so a render that lost the face still gets its other numbers.
    """
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or len(frames) < 2):
        raise InputError(source, f"need a video of at least 2 frames, got shape {frames.shape}")
    series = _Series(portrait, _pick_method(mouth, portrait, phones is not None), source, faceless)
    try:
        for chunk in [frames] if isinstance(frames, np.ndarray) else frames:
            series.add(chunk)
    finally:
        series.close()
    measured, identity, portrait_errors, changes = series.finish()
    num_frames = len(identity)
    if num_frames < 2:
        raise InputError(source, f"need a video of at least 2 frames, got {num_frames}")
    if phones is not None:
        from model.synth.articulation import mouth_track

        reference, reference_name = mouth_track(phones, num_frames, fps)[:, 0], "phones"
    else:
        reference, reference_name = metrics.speech_envelope(audio, sample_rate, num_frames, fps), "envelope"
    boundaries = metrics.block_boundaries(num_frames, block_frames, first_block_frames)

    def window(start: int, end: int) -> dict:
        inside = boundaries[(boundaries >= start) & (boundaries < end)]
        return {
            "start_frame": start,
            "end_frame": end,
            "start_s": start / fps,
            "end_s": end / fps,
            "lipsync_r": metrics.lipsync_r(measured[start:end], reference[start:end]),
            "av_offset_frames": metrics.av_offset_frames(measured[start:end], reference[start:end]),
            "identity_error": float(identity[start:end].mean()),
            "portrait_psnr": metrics.psnr(portrait_errors[start:end].mean()),
            "boundary_jitter": metrics.boundary_jitter(changes, inside),
        }

    overall = window(0, num_frames)
    spans = metrics.window_spans(num_frames, max(1, int(round(window_seconds * fps))))
    windows = [window(s, e) for s, e in spans]
    centres = [(w["start_s"] + w["end_s"]) / 2 for w in windows]
    return {
        **{name: overall[name] for name in METRICS},
        "lipsync_reference": reference_name,
        "mouth_method": series.method,
        "frames": num_frames,
        "fps": float(fps),
        "seconds": num_frames / fps,
        "block_frames": block_frames,
        "first_block_frames": first_block_frames,
        "windows": windows,
        "drift": {f"{name}_per_min": metrics.slope_per_minute(centres, [w[name] for w in windows]) for name in METRICS},
    }


def _frames(chunks: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    for chunk in chunks:
        yield from chunk


def score_truth_video(
    video_path: str | os.PathLike,
    truth_video_path: str | os.PathLike,
    portrait_path: str | os.PathLike,
    max_pixels: int | None = None,
) -> dict:
    """PSNR of the render against a ground-truth video over the frames both have (the mean of per-frame squared
    errors) and at frame 0, with the still portrait's (fitted to the render's size, as `evaluate` fits it: centre crop,
    resize) against the same frames. Both videos are streamed in step, a frame of each at a time; a truth of another
    size is fitted to the render's the same way, one of more than `max_pixels` (default: a portrait's limit) refused
    from its header. The frame rates must agree: frame i is one instant in both."""
    from PIL import Image

    from model.media.image import MAX_PORTRAIT_PIXELS, fit_image, load_portrait
    from model.media.video import stream_video

    source = os.fspath(truth_video_path)
    video, truth = stream_video(video_path), stream_video(truth_video_path)
    max_pixels = MAX_PORTRAIT_PIXELS if max_pixels is None else max_pixels
    if truth.width * truth.height > max_pixels:
        raise InputError(source, f"truth video is {truth.width}x{truth.height}, over the limit of {max_pixels} pixels")
    if truth.fps is None or video.fps is None or abs(truth.fps - video.fps) > 1e-3:
        rates = " fps, the render ".join("unknown" if r is None else f"{r:g}" for r in (truth.fps, video.fps))
        raise InputError(source, f"truth video is {rates} fps: frames would not match")
    portrait = load_portrait(portrait_path, video.height, video.width)
    renders, truths = _frames(video), _frames(truth)
    first_render, first_truth = next(renders, None), next(truths, None)
    if first_render is None:
        raise InputError(os.fspath(video_path), "video has no frames")
    if first_truth is None:
        raise InputError(source, "truth video has no frames")
    render_errors, still_errors = [], []
    for frame, true in zip(itertools.chain([first_render], renders), itertools.chain([first_truth], truths)):
        if true.shape != frame.shape:
            true = fit_image(Image.fromarray(true), frame.shape[0], frame.shape[1])
        render_errors.append(metrics.squared_errors(frame[None], true)[0])
        still_errors.append(metrics.squared_errors(portrait[None], true)[0])
    render, still = np.array(render_errors), np.array(still_errors)
    return {
        "truth_psnr": metrics.psnr(render.mean()),
        "still_truth_psnr": metrics.psnr(still.mean()),
        "truth_psnr_frame0": metrics.psnr(render[0]),
        "still_truth_psnr_frame0": metrics.psnr(still[0]),
        "truth_frames": len(render),
    }


def truth_psnr_line(scores: dict) -> str:
    """The render's PSNR against the truth video beside the still portrait's, for people (CLI output)."""
    return (
        f"PSNR against the truth video ({scores['truth_frames']} frames): render {scores['truth_psnr']:.2f} dB, "
        f"still portrait {scores['still_truth_psnr']:.2f} dB (frame 0: {scores['truth_psnr_frame0']:.2f} / "
        f"{scores['still_truth_psnr_frame0']:.2f} dB)"
    )


def evaluate(
    video_path: str | os.PathLike,
    portrait_path: str | os.PathLike,
    audio_path: str | os.PathLike,
    truth_path: str | os.PathLike | None = None,
    block_frames: int = metrics.BLOCK_FRAMES,
    first_block_frames: int = metrics.FIRST_BLOCK_FRAMES,
    mouth: MouthMethod = "auto",
    window_seconds: float = WINDOW_SECONDS,
    truth_video_path: str | os.PathLike | None = None,
) -> dict:
    """Read the files and `score` them, the video streamed (memory holds one chunk of frames, however long
    it is). The portrait is fitted (centre crop, resize) to the video's size. With `truth_video_path`, the
    `score_truth_video` numbers too."""
    from model.media.audio import load_audio
    from model.media.image import load_portrait
    from model.media.video import stream_video

    video = stream_video(video_path)
    portrait = load_portrait(portrait_path, video.height, video.width)
    audio = load_audio(audio_path, SAMPLE_RATE)
    phones = None
    if truth_path is not None:
        from model.synth.world import load_truth_phones

        try:
            with open(truth_path) as f:
                phones = load_truth_phones(json.load(f))
        except FileNotFoundError:
            raise InputError(os.fspath(truth_path), "file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(os.fspath(truth_path), f"not a SynthTalk truth file: {err}") from None
    result = score(
        video,
        video.fps,
        portrait,
        audio,
        SAMPLE_RATE,
        phones,
        block_frames,
        first_block_frames,
        mouth,
        window_seconds,
        source=os.fspath(portrait_path),
    )
    if truth_video_path is not None:
        result |= score_truth_video(video_path, truth_video_path, portrait_path)
    return result
