"""Motion-gated paste-back of the portrait: the detail the VAE lost, returned wherever a frame still shows the portrait.

Why: a small VAE cannot reproduce its input (the tiny model's softens eyes, hair edges and skin tone: docs/results.md
gives its numbers), and every generated frame inherits that loss, though the portrait itself is known exactly at
inference. Talking-head systems paste the generated face back into the source picture for the same
reason (Wav2Lip, LivePortrait's paste-back); this is the per-pixel, motion-gated form of it.

What: with `P` the portrait and `D` the VAE's decode of the portrait's own latent, each decoded frame `f` becomes
`f + g * (P - D)`, where `g = max(0, 1 - max_rgb|f - D| / threshold)` per pixel: where the frame has not moved from
the decoded portrait (`g = 1`) it shows the portrait's own pixels; where it moved by `threshold` grey levels or more
it is the generator's frame, untouched; in between it gets the detail in proportion (with the tiny model's 128, a
mouth pixel that darkened by 64 levels gets half of it). A render whose latent frame 0 is pinned to the portrait
therefore starts on the portrait exactly.

Stateless per frame: it adds no latency to a stream, and a restored render needs only the portrait.
"""

from __future__ import annotations

import torch

from model.config import PasteBackConfig
from model.deflicker import GREY_LEVELS_PER_UNIT


class PasteBack:
    """The paste-back of one portrait. portrait and decoded: (B, 3, 1, H, W) in [-1, 1], the portrait and the VAE's
    decode of its latent."""

    def __init__(self, portrait: torch.Tensor, decoded: torch.Tensor, cfg: PasteBackConfig):
        if portrait.shape != decoded.shape:
            raise ValueError(f"portrait {tuple(portrait.shape)} and its decode {tuple(decoded.shape)} differ in shape")
        if cfg.threshold <= 0:
            raise ValueError(f"paste-back threshold must be > 0 grey levels (0 means off), got {cfg.threshold}")
        detail = portrait.to(decoded.device, decoded.dtype) - decoded
        self.decoded, self.detail, self.threshold = decoded, detail, cfg.threshold

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """Decoded frames (B, 3, n, H, W) in [-1, 1] -> those frames with the portrait's detail where they match it."""
        motion = (video - self.decoded).abs().amax(dim=1, keepdim=True) * GREY_LEVELS_PER_UNIT
        gate = (1.0 - motion / self.threshold).clamp(min=0.0)
        return (video + gate * self.detail).clamp(-1.0, 1.0)
