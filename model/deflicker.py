"""Motion-gated deflicker at latent-frame crossings: a small VAE seam is spread over the frames after it.

Why: a causal video VAE draws each latent frame's video frames from that latent (and its past), so the part of its
reconstruction error that differs from one latent frame to the next appears as a whole-frame jump at every crossing,
at a fixed rate: flicker. Every block boundary of the generator is such a crossing. For the tiny VAE the jump is ~2
grey levels while the face moves 0.3-0.5 a frame (docs/results.md, section 1).

What: at each crossing, the difference `delta` between the last frame before it and the first frame after it is
gated per pixel, `g = max(0, 1 - max_rgb|delta| / threshold)`, so real motion (the mouth, blinks, head edges: more
than `threshold` grey levels) passes untouched, as in motion-adaptive temporal denoisers such as ffmpeg's atadenoise.
What is left is added back to the first `frames` frames with fading weights 1 - (j + 1) / (frames + 1): the jump
becomes `frames + 1` steps of equal size.

Causal: it needs only the last frame before a crossing, and the fade ends inside one latent frame's frames
(`frames < temporal stride`, checked by `Preset`), so streaming adds no latency and a stream's state is that one frame.
"""

from __future__ import annotations

import torch

from model.config import DeflickerConfig

GREY_LEVELS_PER_UNIT = 127.5  # video tensors are in [-1, 1]


def fade_weights(frames: int) -> torch.Tensor:
    """(frames,) the share of the gated jump added back to the j-th frame after a crossing."""
    return 1.0 - torch.arange(1, frames + 1, dtype=torch.float32) / (frames + 1)


def blend_crossing(previous: torch.Tensor, chunk: torch.Tensor, cfg: DeflickerConfig) -> torch.Tensor:
    """One crossing. previous: (B, 3, 1, H, W) the last decoded frame before it; chunk: (B, 3, m, H, W) the video
    frames of the latent frame after it, in [-1, 1], as decoded. Returns the chunk deflickered."""
    if cfg.frames == 0:
        return chunk
    delta = previous - chunk[:, :, :1]
    motion = delta.abs().amax(dim=1, keepdim=True) * GREY_LEVELS_PER_UNIT
    gated = delta * (1.0 - motion / cfg.threshold).clamp(min=0.0)
    n = min(cfg.frames, chunk.shape[2])
    weights = fade_weights(cfg.frames)[:n].to(chunk.device, chunk.dtype).view(1, 1, n, 1, 1)
    out = chunk.clone()
    out[:, :, :n] = (chunk[:, :, :n] + weights * gated).clamp(-1.0, 1.0)
    return out


def deflicker_video(video: torch.Tensor, temporal_stride: int, cfg: DeflickerConfig) -> torch.Tensor:
    """A whole decoded video (B, 3, 1 + s*k, H, W) in [-1, 1]: every crossing, as a stream would see them.

    Each crossing is judged on the decoder's own frames (not on already-blended ones), as `StreamingDecoder` does.
    """
    chunks = [video[:, :, :1]] + list(video[:, :, 1:].split(temporal_stride, dim=2))
    out = [chunks[0]] + [blend_crossing(prev[:, :, -1:], chunk, cfg) for prev, chunk in zip(chunks[:-1], chunks[1:])]
    return torch.cat(out, dim=2)
