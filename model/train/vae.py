"""Stage 1: the tiny VAE (DESIGN 3.4.1). Reconstruction L1 + L2 and a small KL, in three phases.

1. `image_steps` on single frames: a causal video VAE encodes the first frame of a clip on its own, and that spatial
   path learns several times faster per second of CPU on frames than on windows.
2. `causal_steps` on windows of `causal_latent_frames` with full causal 3D convs.
3. The rest on windows of `latent_frames` with the residual blocks' causal convs *frame-local* (their temporal taps
   held at zero); only the resamplers' time convs mix frames.

Why phase 3: stacked causal convs make the encoder and the decoder recurrences whose reach (up to ~30 latent frames
here, see `decoder_context_frames`) is far longer than any window a CPU can train on. After phase 2 the VAE decoded
its first chunks well (MAE 12/255) and then degraded chunk by chunk past the window (55/255 by the 5th), in the
encoder as well as the decoder. Frame-local residual blocks bound the reach to 1 latent frame back in the encoder and
3 in the decoder, which a 4-latent-frame window covers, so any length decodes like the trained window. The weights
keep Wan2.1's shapes and checkpoint format; the taps are simply zero. Phase 2 stays because the shipped VAE was
trained through it (the fix came mid-run) and `make train-tiny` retraces that schedule; `causal_steps=0` is the
cleaner schedule for a new run.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.synth import Clip
from model.train.data import clip_video
from model.vae import WanVAE, frames_to_tensor


class VAETrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: int = 4
    latent_frames: int = 4  # phase 3 windows of 1 + s*(n-1) video frames: they cover the frame-local VAE's reach
    causal_latent_frames: int = 3  # phase 2 windows
    image_steps: int = 700  # phases, see the module docstring
    causal_steps: int = 1051
    image_batch: int = 16
    lr: float = 2e-3  # image steps; windows train at half of it
    kl_weight: float = 1e-4


class VAEStage:
    name = "vae"

    def __init__(self, vae: WanVAE, clips: list[Clip], cfg: VAETrainConfig, seed: int = 0):
        self.vae, self.cfg = vae.train().requires_grad_(True), cfg
        self.frames = [c.frames for c in clips]  # uint8, converted per batch
        self.window = vae.num_video_frames(cfg.latent_frames)
        self.causal_window = vae.num_video_frames(cfg.causal_latent_frames)
        self.rng = np.random.default_rng(seed)
        self.opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)

    def state_modules(self):
        return {"vae": self.vae}

    def optimizers(self):
        return {"vae": self.opt}

    def sample(self, batch: int, window: int) -> torch.Tensor:
        videos = []
        for _ in range(batch):
            frames = self.frames[int(self.rng.integers(len(self.frames)))]
            start = int(self.rng.integers(len(frames) - window + 1))
            videos.append(frames_to_tensor(frames[start : start + window]))
        return torch.cat(videos)

    def step(self, index: int) -> dict[str, float]:
        images = index < self.cfg.image_steps
        local = index >= self.cfg.image_steps + self.cfg.causal_steps
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr if images else 0.5 * self.cfg.lr
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
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = l1 + l2 + self.cfg.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.opt.step()
        if local:
            zero_temporal_taps(self.vae)  # projected: Adam's momentum must not revive them
        return {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def residual_temporal_convs(vae: WanVAE) -> list[torch.nn.Conv3d]:
    """The causal 3D convs other than the resamplers' time convs: the ones kept frame-local."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return [
        m
        for name, m in vae.model.named_modules()
        if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1 and "time_conv" not in name
    ]


@torch.no_grad()
def zero_temporal_taps(vae: WanVAE) -> None:
    """Keep only each conv's current-frame tap (the last along time: causal padding puts the past first)."""
    for conv in residual_temporal_convs(vae):
        conv.weight[:, :, :-1].zero_()


@torch.no_grad()
def latent_statistics(vae: WanVAE, clips: list[Clip], temporal_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw posterior means over the clips: the VAE's latent normalisation."""
    was_training = vae.training
    vae.eval()
    z = torch.cat([vae.posterior(clip_video(c, temporal_stride)).mean.transpose(0, 1).flatten(1) for c in clips], dim=1)
    vae.train(was_training)
    return z.mean(dim=1), z.std(dim=1)
