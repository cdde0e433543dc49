"""Mouth opening from pixels, for SynthTalk-like faces: the open mouth is the dark region in the lower face.

The mouth is located once, on the portrait (the face at rest, mouth closed): the lips are the darkest
row of the lower-central face. Every frame is then measured inside a window around that spot, large
enough to follow the idle head motion: a pixel counts as open mouth by how much darker than the resting
lips it is (linearly, so a blurred or half-covered pixel counts in part), and the opening is the dark vertical extent of
the mouth's central columns, as a fraction of the image height.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.errors import InputError

# Where a SynthTalk-like portrait's mouth can be (fractions of the image), and what the window must absorb.
_SEARCH_ROWS = (0.5, 0.85)
_SEARCH_COLS = (0.35, 0.65)
_LIP_DARKNESS = 0.15  # lips are at least this much darker than the surrounding skin (relative luma)
_MOTION_PAD = 0.025  # head sway the window tolerates, fraction of the image height
_MAX_DROP = 0.13  # how far below the lip line an open mouth reaches, fraction of the image height
_CORE_FRACTION = 0.25  # central columns measured, as a fraction of the mouth's width


def luma(frames: np.ndarray) -> np.ndarray:
    """Rec.601 luma in [0, 1] of uint8 RGB (..., 3)."""
    return (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0


@dataclass(frozen=True)
class MouthRegion:
    row: float  # lip line, pixels
    col: float
    half_width: float  # pixels, at rest
    rows: slice  # measurement window
    cols: slice
    lip_luma: float

    def mask(self, height: int, width: int) -> np.ndarray:
        """bool (H, W): True inside the measurement window (left out of identity comparisons)."""
        m = np.zeros((height, width), dtype=bool)
        m[self.rows, self.cols] = True
        return m


def locate_mouth(portrait: np.ndarray, source: str = "portrait") -> MouthRegion:
    """Find the lips on a SynthTalk-like portrait (uint8 (H, W, 3), mouth closed).

    The lips are the top-most row of the lower-central face that is clearly darker than the skin; the chin
    is where the skin ends below them. The window spans the lips to just above the chin.
    """
    height, width = portrait.shape[:2]
    r0, r1 = int(_SEARCH_ROWS[0] * height), int(np.ceil(_SEARCH_ROWS[1] * height))
    c0, c1 = int(_SEARCH_COLS[0] * width), int(np.ceil(_SEARCH_COLS[1] * width))
    area = luma(portrait[r0:r1, c0:c1])
    skin = float(np.median(area[: max(1, len(area) // 2)]))
    darkness = np.clip((skin - area) / max(skin, 1e-3), 0, 1)
    dark_rows = np.nonzero(darkness.max(axis=1) >= _LIP_DARKNESS)[0]
    if len(dark_rows) == 0:
        raise InputError(source, "no mouth found: nothing in the lower face is darker than the skin")
    first = int(dark_rows[0])
    near = slice(first, min(first + 3, len(area)))  # the lip line: its first dark rows
    best = near.start + int(np.argmax(darkness[near].sum(axis=1)))
    weights = darkness[near].sum(axis=1)
    row = r0 + float((np.arange(near.start, near.stop) * weights).sum() / weights.sum())
    lip_cols = np.nonzero(darkness[best] > 0.5 * darkness[best].max())[0]
    col = c0 + float(lip_cols.mean())
    half_width = max((lip_cols.max() - lip_cols.min() + 1) / 2, 1.0)

    # The chin: first row below the lips (and their anti-aliasing) whose centre differs from the skin.
    centre = luma(portrait[:, max(int(col) - 1, 0) : int(col) + 2]).mean(axis=1)
    below = np.arange(int(row) + 3, height)
    off_skin = below[np.abs(centre[below] - skin) > _LIP_DARKNESS * skin]
    chin = int(off_skin[0]) if len(off_skin) else height
    motion = _MOTION_PAD * height
    rows = slice(max(int(row - motion - 1), 0), min(int(row + _MAX_DROP * height), chin - int(np.ceil(motion)), height))
    cols = slice(
        max(int(col - 1.3 * half_width - motion - 1), 0), min(int(np.ceil(col + 1.3 * half_width + motion + 1)), width)
    )
    lip_luma = float(luma(portrait[r0 + best, int(col) - 1 : int(col) + 2]).min())  # the lips' own colour
    return MouthRegion(row, col, half_width, rows, cols, lip_luma)


def mouth_opening(frames: np.ndarray, region: MouthRegion) -> np.ndarray:
    """(N,) opening per frame of uint8 (N, H, W, 3): dark vertical extent / image height."""
    height = frames.shape[1]
    window = luma(frames[:, region.rows, region.cols])
    # Linear in how much of a pixel is open mouth: 0 at the lips' colour (or brighter), 1 at black.
    dark = np.clip((region.lip_luma - window) / max(region.lip_luma, 1e-3), 0, 1)
    column_extent = dark.sum(axis=1)  # (N, cols)
    core = max(1, int(round(_CORE_FRACTION * 2 * region.half_width)))
    top = np.sort(column_extent, axis=1)[:, -core:]
    return top.mean(axis=1) / height
