"""Stage 1: the tiny VAE (DESIGN 3.4.1). Reconstruction L1 + L2 + an edge term and a small KL, in phases.

1. `image_steps` on single frames: a causal video VAE encodes the first frame of a clip on its own, and that spatial
   path learns several times faster per second of CPU on frames than on windows.
2. `causal_steps` on windows of `causal_latent_frames` with full causal 3D convs (0 by default: see below).
3. The rest on windows of `latent_frames` with the residual blocks' causal convs *frame-local* (their temporal taps
   held at zero); only the resamplers' time convs mix frames.

A VAE without temporal compression (the tiny preset's; `model.config` says why) is a frame VAE: it trains on
frames only, its residual convs frame-local from the start.

Why phase 3: stacked causal convs make the encoder and the decoder recurrences whose reach (up to ~30 latent frames
here, see `decoder_context_frames`) is far longer than any window a CPU can train on. A VAE trained with full taps
(the 64x64 model's, `runs/tiny2`) decoded its first chunks well (MAE 12/255) and then degraded chunk by chunk past the
window (55/255 by the 5th), in the encoder as well as the decoder. Frame-local residual blocks bound the reach to 1
latent frame back in the encoder and 3 in the decoder, which a 4-latent-frame window covers, so any length decodes
like the trained window. The weights keep Wan2.1's shapes and checkpoint format; the taps are simply zero.

The VAE is fully convolutional (its one attention is over the lowest-resolution grid), so it trains on random
`crop` x `crop` patches of the frames: a quarter of the pixels of a 128x128 frame per sample, the same weights.
The edge term (L1 between the horizontal and vertical pixel differences of the reconstruction and of the truth)
keeps the small high-contrast parts a plain L1/L2 blurs first: eyes, hair edges, teeth. On windows a temporal term
does the same along time (L1 between frame-to-frame differences): without it the decoder's temporal upsampling
shimmers, 2.5-4 grey levels from one frame to the next where SynthTalk's truth moves 0.3-0.6, which costs a steady
head more PSNR than its per-frame error suggests. The learning rate follows a
cosine from `lr` down to `lr * final_lr_fraction` over the stage's step cap (`total_steps`).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.synth import Clip
from model.train.data import clip_video
from model.vae import WanVAE, frames_to_tensor, residual_temporal_convs


class VAETrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: int = 4
    latent_frames: int = 4  # phase 3 windows of 1 + s*(n-1) video frames: they cover the frame-local VAE's reach
    causal_latent_frames: int = 3  # phase 2 windows
    image_steps: int = 10_000  # phases, see the module docstring (about 0.4 s a step on one core at 128x128)
    causal_steps: int = 0
    image_batch: int = 8
    crop: int | None = 64  # square training patches of the image steps (pixels); None: whole frames
    window_crop: int | None = 48  # of the window steps (13 frames a sample: smaller patches keep a step affordable)
    # image steps; windows train at half of it. 2e-3 (the 64x64 VAE's) left base_dim 16 at the mean colour (L1 0.23)
    # for 300+ steps on textured frames; 1e-3 and 3e-4 both left it by step 60 (a 300-step comparison, 32x32 crops).
    lr: float = 5e-4
    final_lr_fraction: float = 0.05
    kl_weight: float = 1e-4
    edge_weight: float = 1.0
    temporal_weight: float = 1.0  # window steps only (one frame has no differences)


def edge_l1(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical neighbour differences of two (B, C, T, H, W) videos."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return 0.5 * ((dx(recon) - dx(video)).abs().mean() + (dy(recon) - dy(video)).abs().mean())


def temporal_l1(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """L1 between the frame-to-frame differences of two (B, C, T, H, W) videos (zero for a single frame)."""
    if video.shape[2] < 2:
        return video.new_zeros(())
    return (recon.diff(dim=2) - video.diff(dim=2)).abs().mean()


class VAEStage:
    name = "vae"

    def __init__(
        self, vae: WanVAE, clips: list[Clip], cfg: VAETrainConfig, seed: int = 0, total_steps: int | None = None
    ):
        self.vae, self.cfg = vae.train().requires_grad_(True), cfg
        self.frames = [c.frames for c in clips]  # uint8, converted per batch
        self.window = vae.num_video_frames(cfg.latent_frames)
        self.causal_window = vae.num_video_frames(cfg.causal_latent_frames)
        self.total_steps = total_steps
        self.rng = np.random.default_rng(seed)
        self.opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)

    def state_modules(self):
        return {"vae": self.vae}

    def optimizers(self):
        return {"vae": self.opt}

    def sample(self, batch: int, window: int) -> torch.Tensor:
        size = self.cfg.crop if window == 1 else self.cfg.window_crop
        videos = []
        for _ in range(batch):
            frames = self.frames[int(self.rng.integers(len(self.frames)))]
            start = int(self.rng.integers(len(frames) - window + 1))
            h, w = frames.shape[1:3]
            crop = min(size or h, h, w)
            y, x = int(self.rng.integers(h - crop + 1)), int(self.rng.integers(w - crop + 1))
            videos.append(frames_to_tensor(frames[start : start + window, y : y + crop, x : x + crop]))
        return torch.cat(videos)

    def phase(self, index: int) -> tuple[bool, bool]:
        """(single frames?, frame-local residual convs?) at step `index`. A VAE without temporal compression mixes
        no frames once its residual convs are frame-local: all its steps are frame steps, with the taps held at zero
        (they would otherwise keep their random init, unseen by single frames, and mix frames at inference)."""
        if self.vae.temporal_stride == 1:
            return True, True
        return index < self.cfg.image_steps, index >= self.cfg.image_steps + self.cfg.causal_steps

    def learning_rate(self, index: int) -> float:
        lr = self.cfg.lr if self.phase(index)[0] else 0.5 * self.cfg.lr
        if self.total_steps:
            progress = min(index / self.total_steps, 1.0)
            lr *= self.cfg.final_lr_fraction + (1 - self.cfg.final_lr_fraction) * 0.5 * (1 + np.cos(np.pi * progress))
        return float(lr)

    def step(self, index: int) -> dict[str, float]:
        images, local = self.phase(index)
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate(index)
        if images:
            video = self.sample(self.cfg.image_batch, 1)
        else:
            video = self.sample(self.cfg.batch, self.window if local else self.causal_window)
        if local:
            zero_temporal_taps(self.vae)  # entering phase 3, or resuming in it
        posterior = self.vae.posterior(video)
        recon = self.vae.model.decode(posterior.sample()).sample
        l1 = (recon - video).abs().mean()
        l2 = (recon - video).pow(2).mean()
        edge = edge_l1(recon, video)
        temporal = temporal_l1(recon, video)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = l1 + l2 + self.cfg.edge_weight * edge + self.cfg.temporal_weight * temporal + self.cfg.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.opt.step()
        if local:
            zero_temporal_taps(self.vae)  # projected: Adam's momentum must not revive them
        losses = {"l1": l1.item(), "l2": l2.item(), "edge": edge.item(), "kl": kl.item()}
        return losses if images else {**losses, "temporal": temporal.item()}


@torch.no_grad()
def zero_temporal_taps(vae: WanVAE) -> None:
    """Keep only each conv's current-frame tap (the last along time: causal padding puts the past first)."""
    for conv in residual_temporal_convs(vae.model):
        conv.weight[:, :, :-1].zero_()


@torch.no_grad()
def latent_statistics(
    vae: WanVAE, clips: list[Clip], temporal_stride: int, max_clips: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw posterior means over the first `max_clips` clips: the VAE's latent
    normalisation (a few clips pin the statistics of a few hundred frames; deterministic, so a resumed run agrees)."""
    was_training = vae.training
    vae.eval()
    clips = clips[:max_clips]
    z = torch.cat([vae.posterior(clip_video(c, temporal_stride)).mean.transpose(0, 1).flatten(1) for c in clips], dim=1)
    vae.train(was_training)
    return z.mean(dim=1), z.std(dim=1)
