"""The quality metrics, on plain arrays: lip-sync, audio-visual offset, identity, block seams, drift.

Conventions:
- `av_offset_frames` > 0 means the audio lags the video (the sound comes that many frames after the mouth
  movement that matches it); "audio delayed by 5 frames" reads +5.
- Block boundaries: the generator emits blocks of latent frames; the first block yields
  `first_block_frames` video frames (1 + 4 * 2 = 9 for 3 latent frames) and every later one
  `block_frames` (4 * 3 = 12). A boundary is the pair of frames (b - 1, b) for
  b = first_block_frames + k * block_frames.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

MAX_LAG_FRAMES = 10
_ENVELOPE_BAND_HZ = (300.0, 4000.0)  # where speech energy follows the mouth (voice, not breath or hum)


def block_layout(temporal_stride: int, frames_per_block: int) -> dict:
    """Video frames of the first block and of every later one (the first latent frame decodes to one video frame)."""
    return {
        "first_block_frames": 1 + temporal_stride * (frames_per_block - 1),
        "block_frames": temporal_stride * frames_per_block,
    }


# The default layout: Wan2.1's VAE (temporal stride 4) and 3 latent frames a block.
_DEFAULT_LAYOUT = block_layout(4, 3)
FIRST_BLOCK_FRAMES = _DEFAULT_LAYOUT["first_block_frames"]
BLOCK_FRAMES = _DEFAULT_LAYOUT["block_frames"]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side does not vary (a frozen mouth carries no sync)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


def lipsync_r(measured: np.ndarray, reference: np.ndarray) -> float:
    return pearson(measured, reference)


def lagged_correlations(measured: np.ndarray, reference: np.ndarray, max_lag: int = MAX_LAG_FRAMES) -> dict[int, float]:
    """Pearson r of measured[t] against reference[t + lag] for every lag in [-max_lag, max_lag]."""
    n = min(len(measured), len(reference))
    out = {}
    for lag in range(-max_lag, max_lag + 1):
        if n - abs(lag) < 2:
            continue
        if lag >= 0:
            out[lag] = pearson(measured[: n - lag], reference[lag:n])
        else:
            out[lag] = pearson(measured[-lag:n], reference[: n + lag])
    return out


def av_offset_frames(measured: np.ndarray, reference: np.ndarray, max_lag: int = MAX_LAG_FRAMES) -> int:
    """Lag of peak cross-correlation: > 0 when the audio (reference) lags the video (measured)."""
    correlations = lagged_correlations(measured, reference, max_lag)
    return max(correlations, key=lambda lag: (correlations[lag], -abs(lag))) if correlations else 0


def speech_envelope(audio: np.ndarray, sample_rate: int, num_frames: int, fps: float) -> np.ndarray:
    """(num_frames,) RMS of the speech band over each frame's span: the opening the audio implies."""
    sos = signal.butter(4, _ENVELOPE_BAND_HZ, btype="band", fs=sample_rate, output="sos")
    band = signal.sosfilt(sos, audio.astype(np.float64))
    per_frame = sample_rate / fps
    edges = np.round(np.arange(num_frames + 1) * per_frame).astype(int)
    energy = np.concatenate([[0.0], np.cumsum(band * band)])
    edges = np.clip(edges, 0, len(band))
    counts = np.maximum(np.diff(edges), 1)
    return np.sqrt(np.diff(energy[edges]) / counts)


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """(N - 1,) mean absolute pixel change between consecutive frames, pixel units in [0, 1]."""
    changes = np.empty(max(len(frames) - 1, 0))
    for i in range(len(changes)):  # one pair at a time: long videos stay within memory
        changes[i] = np.abs(frames[i + 1].astype(np.int16) - frames[i].astype(np.int16)).mean() / 255.0
    return changes


def block_boundaries(
    num_frames: int, block_frames: int = BLOCK_FRAMES, first_block_frames: int = FIRST_BLOCK_FRAMES
) -> np.ndarray:
    """First frame index b of every block after the first, for b < num_frames."""
    return np.arange(first_block_frames, num_frames, block_frames)


def boundary_jitter(changes: np.ndarray, boundaries: np.ndarray) -> float | None:
    """Mean change across block boundaries over the mean change of the frame pairs next to them inside
    the blocks (the pair just before and just after each boundary). 1.0 is seamless; None without a
    boundary that has both neighbours. Comparing with the neighbouring pairs, not every pair, keeps the
    ratio from depending on what happens to move elsewhere in the video."""
    # changes[i] is the pair (i, i + 1): a boundary at b is changes[b - 1], its neighbours b - 2 and b.
    usable = boundaries[(boundaries >= 2) & (boundaries < len(changes))]
    if len(usable) == 0:
        return None
    across = changes[usable - 1].mean()
    inside = 0.5 * (changes[usable - 2] + changes[usable]).mean()
    return float(across / inside) if inside > 1e-12 else (1.0 if across <= 1e-12 else float("inf"))


def identity_errors(frames: np.ndarray, portrait: np.ndarray, mouth_mask: np.ndarray) -> np.ndarray:
    """(N,) mean |frame - portrait| outside the mouth region, pixel units in [0, 1]."""
    keep = ~mouth_mask
    reference = portrait.astype(np.int16)[keep]
    return np.array([np.abs(f.astype(np.int16)[keep] - reference).mean() / 255.0 for f in frames])


def slope_per_minute(centres_seconds: list[float], values: list[float | None]) -> float | None:
    """Least-squares slope of a metric over the render, per minute; None with fewer than two windows."""
    points = [(t / 60.0, v) for t, v in zip(centres_seconds, values) if v is not None and np.isfinite(v)]
    if len(points) < 2:
        return None
    t, v = np.array(points).T
    return float(np.polyfit(t, v, 1)[0])


def window_spans(num_frames: int, window_frames: int) -> list[tuple[int, int]]:
    """Consecutive windows; a tail shorter than half a window joins the window before it."""
    starts = list(range(0, num_frames, window_frames)) or [0]
    spans = [(s, min(s + window_frames, num_frames)) for s in starts]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < window_frames / 2:
        spans[-2] = (spans[-2][0], spans[-1][1])
        spans.pop()
    return spans


def latent_seam_jitter(
    frames: np.ndarray, temporal_stride: int, first_block_frames: int, block_frames: int
) -> float | None:
    """`boundary_jitter` measured at the latent-frame boundaries *inside* the generator's blocks.

    Every block boundary is also a boundary between two latent frames' video frames, so the block seams include the
    VAE's own seams. These boundaries have only the VAE's: next to `boundary_jitter` they tell the two apart.
    """
    latent_starts = np.arange(1 + temporal_stride, len(frames), temporal_stride)  # frame 1 + s*k starts latent k+1
    inside = np.setdiff1d(latent_starts, block_boundaries(len(frames), block_frames, first_block_frames))
    return boundary_jitter(frame_changes(frames), inside)


def _frame_differences(frames: np.ndarray, reference: np.ndarray):
    """Each uint8 frame minus its reference (an image, or one frame each), float32, one frame at a time."""
    reference = np.asarray(reference)
    per_frame = reference.ndim == 4
    if per_frame and len(reference) < len(frames):
        raise ValueError(f"{len(frames)} frames but {len(reference)} reference frames")
    for i, frame in enumerate(frames):
        yield frame.astype(np.float32) - (reference[i] if per_frame else reference).astype(np.float32)


def squared_errors(frames: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(N,) mean squared error (0-255 units) of each uint8 frame (N, H, W, 3) against a reference image (H, W, 3)
    or one reference frame each (N, H, W, 3), over the pixels where `mask` (H, W) is True (all without one).
    One frame at a time, so a long video costs one float per frame."""
    return np.array(
        [
            float(np.square((diff[mask] if mask is not None else diff).astype(np.float64)).mean())
            for diff in _frame_differences(frames, reference)
        ],
        dtype=np.float64,
    )


def absolute_errors(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N,) mean absolute error (0-255 units) of each uint8 frame against a reference image or one reference frame
    each (as `squared_errors`), one frame at a time."""
    return np.array([float(np.abs(diff).mean()) for diff in _frame_differences(frames, reference)], dtype=np.float64)


def psnr(mean_squared_error: float) -> float:
    """Peak signal-to-noise ratio (dB, peak 255) of a mean squared error: over a clip, of the clip's mean MSE (frames
    weigh equally; one identical frame does not make it infinite). An exact match reads 100 dB, not infinity."""
    return float(10.0 * np.log10(255.0**2 / max(float(mean_squared_error), 255.0**2 * 1e-10)))
