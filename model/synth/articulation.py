"""From phone timings to mouth shapes per video frame, with coarticulation.

Each phone holds its mouth target for its whole span; the targets are then smoothed in time with a
Gaussian so that a mouth already moves toward the next phone and still carries the last one (the way a
real mouth anticipates and lags). Frame k shows the mouth at its centre time (k + 0.5) / fps.

The metrics use this same function on a truth file's timings to get "the opening the phones imply".
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from model.synth.phones import PHONES, REST, PhoneTiming

MOUTH_PARAMS = ("opening", "width", "rounding")
COARTICULATION_SECONDS = 0.05  # std of the smoothing kernel (10-90% rise ~130 ms, as real lips)
_STEP_SECONDS = 0.001  # resolution of the target track before smoothing


def mouth_track(phones: list[PhoneTiming], num_frames: int, fps: float) -> np.ndarray:
    """(num_frames, 3) float32 of (opening, width, rounding); the mouth rests outside the phones."""
    end = max(num_frames / fps, phones[-1].end if phones else 0.0)
    steps = int(np.ceil(end / _STEP_SECONDS)) + 1
    rest = np.array([REST.opening, REST.width, REST.rounding])
    targets = np.tile(rest, (steps, 1))
    for p in phones:
        info = PHONES[p.phone]
        i0, i1 = int(round(p.start / _STEP_SECONDS)), int(round(p.end / _STEP_SECONDS))
        targets[i0:i1] = (info.opening, info.width, info.rounding)
    smooth = gaussian_filter1d(targets, COARTICULATION_SECONDS / _STEP_SECONDS, axis=0, mode="nearest")
    centres = ((np.arange(num_frames) + 0.5) / fps / _STEP_SECONDS).round().astype(int)
    return smooth[np.clip(centres, 0, steps - 1)].astype(np.float32)


def shift_phones(phones: list[PhoneTiming], seconds: float) -> list[PhoneTiming]:
    """The same phones `seconds` later (earlier if negative): what delaying the audio does to them."""
    return [PhoneTiming(p.phone, p.start + seconds, p.end + seconds) for p in phones]
