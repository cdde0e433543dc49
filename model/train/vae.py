"""Stage 1: the tiny VAE (DESIGN 3.4.1). Reconstruction L1 + L2 and a small KL on short causal windows."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.synth import Clip
from model.vae import WanVAE, frames_to_tensor


class VAETrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: int = 4
    latent_frames: int = 2  # windows of 1 + s*(n-1) video frames: short, since every latent frame costs a pass
    lr: float = 1e-3
    kl_weight: float = 1e-4


class VAEStage:
    name = "vae"

    def __init__(self, vae: WanVAE, clips: list[Clip], cfg: VAETrainConfig, seed: int = 0):
        self.vae, self.cfg = vae.train().requires_grad_(True), cfg
        self.frames = [c.frames for c in clips]  # uint8, converted per batch
        self.window = vae.num_video_frames(cfg.latent_frames)
        self.rng = np.random.default_rng(seed)
        self.opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)

    def state_modules(self):
        return {"vae": self.vae}

    def optimizers(self):
        return {"vae": self.opt}

    def sample(self) -> torch.Tensor:
        videos = []
        for _ in range(self.cfg.batch):
            frames = self.frames[int(self.rng.integers(len(self.frames)))]
            start = int(self.rng.integers(len(frames) - self.window + 1))
            videos.append(frames_to_tensor(frames[start:start + self.window]))
        return torch.cat(videos)

    def step(self, index: int) -> dict[str, float]:
        video = self.sample()
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
        return {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


@torch.no_grad()
def reconstruction_error(vae: WanVAE, clip: Clip, temporal_stride: int) -> np.ndarray:
    """The VAE's own reconstruction of a clip, uint8 frames: the floor any generator's identity error is judged by."""
    from model.train.data import clip_video
    from model.vae import tensor_to_frames

    was_training = vae.training
    vae.eval()
    recon = vae.decode(vae.encode(clip_video(clip, temporal_stride)))
    vae.train(was_training)
    return tensor_to_frames(recon)
