"""Score a rendered video against its inputs: portrait, audio, and the truth file's phones when given.

Never reads a ground-truth video: only what a renderer was given and what it produced.
"""

from __future__ import annotations

import json
import os
from typing import Literal

import numpy as np

from model.errors import InputError
from model.eval import metrics
from model.eval.mouth import locate_mouth, mouth_opening

MouthMethod = Literal["auto", "synth", "facemesh"]
WINDOW_SECONDS = 30.0
SAMPLE_RATE = 16000
_SMALL_PORTRAIT = 128  # at or below this size a face mesh is unreliable: read the mouth from pixels
METRICS = ("lipsync_r", "av_offset_frames", "identity_error", "portrait_psnr", "boundary_jitter")


def _pick_method(method: MouthMethod, portrait: np.ndarray, has_truth: bool) -> str:
    if method != "auto":
        return method
    if has_truth or max(portrait.shape[:2]) <= _SMALL_PORTRAIT:
        return "synth"  # a truth file only exists for SynthTalk clips
    from model.eval.facemesh import FaceMesh

    with FaceMesh() as mesh:
        return "facemesh" if mesh.landmarks(portrait) is not None else "synth"


def _mouth(
    frames: np.ndarray, portrait: np.ndarray, method: str, source: str, faceless: str = "error"
) -> tuple[np.ndarray, np.ndarray]:
    """Opening per frame and the bool (H, W) mouth region left out of identity comparisons."""
    height, width = portrait.shape[:2]
    if method == "synth":
        region = locate_mouth(portrait, source)
        return mouth_opening(frames, region), region.mask(height, width)
    if method == "facemesh":
        from model.eval.facemesh import facemesh_mouth_box, facemesh_opening

        rows, cols = facemesh_mouth_box(portrait, source)
        mask = np.zeros((height, width), dtype=bool)
        mask[rows, cols] = True
        opening = facemesh_opening(frames)
        if np.isnan(opening).all():
            if faceless != "closed":
                raise InputError(source, "no face found by the face mesh in any frame")
            opening = np.zeros(len(frames))  # no face, no mouth movement: lip-sync 0
        return opening, mask
    raise ValueError(f"mouth method must be auto, synth or facemesh, got {method!r}")


def score(
    frames: np.ndarray,
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
    """All metrics for frames uint8 (N, H, W, 3) and a portrait uint8 (H, W, 3) of the same size.

    `phones` (list of PhoneTiming) gives the lip-sync reference; without it the speech envelope does.
    `faceless`: when the face mesh finds no face in any frame, raise an InputError ("error") or score the mouth as
    closed throughout ("closed": lip-sync 0), so a render that lost the face still gets its other numbers.
    """
    if frames.ndim != 4 or len(frames) < 2:
        raise InputError(source, f"need a video of at least 2 frames, got shape {frames.shape}")
    if portrait.shape != frames.shape[1:]:
        raise InputError(source, f"portrait is {portrait.shape}, video frames are {frames.shape[1:]}")
    num_frames = len(frames)
    method = _pick_method(mouth, portrait, phones is not None)
    measured, mouth_mask = _mouth(frames, portrait, method, source, faceless)
    if phones is not None:
        from model.synth.articulation import mouth_track

        reference, reference_name = mouth_track(phones, num_frames, fps)[:, 0], "phones"
    else:
        reference, reference_name = metrics.speech_envelope(audio, sample_rate, num_frames, fps), "envelope"
    changes = metrics.frame_changes(frames)
    identity = metrics.identity_errors(frames, portrait, mouth_mask)
    portrait_errors = metrics.squared_errors(frames, portrait, ~mouth_mask)  # per frame, outside the mouth
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
        "mouth_method": method,
        "frames": num_frames,
        "fps": float(fps),
        "seconds": num_frames / fps,
        "block_frames": block_frames,
        "first_block_frames": first_block_frames,
        "windows": windows,
        "drift": {f"{name}_per_min": metrics.slope_per_minute(centres, [w[name] for w in windows]) for name in METRICS},
    }


def evaluate(
    video_path: str | os.PathLike,
    portrait_path: str | os.PathLike,
    audio_path: str | os.PathLike,
    truth_path: str | os.PathLike | None = None,
    block_frames: int = metrics.BLOCK_FRAMES,
    first_block_frames: int = metrics.FIRST_BLOCK_FRAMES,
    mouth: MouthMethod = "auto",
    window_seconds: float = WINDOW_SECONDS,
) -> dict:
    """Read the files and `score` them. The portrait is fitted (centre crop, resize) to the video's size."""
    from model.media.audio import load_audio
    from model.media.image import load_portrait
    from model.media.video import read_video

    frames, fps = read_video(video_path)
    portrait = load_portrait(portrait_path, frames.shape[1], frames.shape[2])
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
    return score(
        frames,
        fps,
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
