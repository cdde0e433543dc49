"""Quality metrics that read a rendered video and its inputs (DESIGN 4). See docs/synthtalk.md."""

from model.eval.evaluate import evaluate, score
from model.eval.metrics import (
    av_offset_frames,
    block_boundaries,
    boundary_jitter,
    frame_changes,
    identity_errors,
    lipsync_r,
    speech_envelope,
)
from model.eval.mouth import locate_mouth, mouth_opening

__all__ = [
    "evaluate",
    "score",
    "lipsync_r",
    "av_offset_frames",
    "boundary_jitter",
    "block_boundaries",
    "frame_changes",
    "identity_errors",
    "speech_envelope",
    "locate_mouth",
    "mouth_opening",
]
