"""Stage 4: few-step distillation by Self-Forcing-style DMD (DESIGN 3.4.4).

The student rolls out through the real generator (`RenderSession.next_latents`): its KV cache, the PSB step plan,
MCI context writes and, since rollouts are longer than the horizon, URCR resets. As in Self-Forcing, each block stops
at a random step of its plan and only that step's x0 prediction carries gradients. Distribution matching: the frozen
teacher gives the real score, an online critic (initialised from the teacher, trained by flow matching on the
student's own outputs) the fake score; the student moves along (x0_fake - x0_real).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from model.config import Preset
from model.dit import CausalWanDiT
from model.generator import AvatarModel, RenderSettings
from model.scheduler import FlowMatchSchedule
from model.synth import Clip
from model.train.common import SinkDenoiser, check_trainable, flow_matching_loss, sample_sigmas
from model.vae import WanVAE


class DistillConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rollout_blocks: int = 5  # > (horizon - sink) / block: every rollout crosses one URCR reset
    score_window_blocks: int = 2  # blocks per teacher/critic window (the teacher's training length)
    lr: float = 2e-5
    critic_lr: float = 1e-4
    critic_steps: int = 1  # critic updates per student update
    min_sigma: float = 0.02
    max_sigma: float = 0.98


def distilled_preset(preset: Preset) -> Preset:
    """The student samples by predicting x0 and re-noising (the few-step sampler it is trained with)."""
    return preset.with_generator(sampler="renoise")


class DistillStage:
    name = "distill"

    def __init__(
        self,
        student: CausalWanDiT,
        teacher: CausalWanDiT,
        vae: WanVAE,
        clips: list[Clip],
        preset: Preset,
        cfg: DistillConfig,
        seed: int = 0,
        critic: CausalWanDiT | None = None,
    ):
        check_trainable(preset)
        self.preset, self.cfg, self.clips = distilled_preset(preset), cfg, clips
        gen = self.preset.generator
        self.n = gen.frames_per_block
        # The real generator around the trainable student (AvatarModel freezes what it is given: unfreeze after).
        self.model = AvatarModel(self.preset, student, vae, description="distillation rollouts")
        self.student = student.requires_grad_(True)
        self.teacher = SinkDenoiser(teacher.eval().requires_grad_(False), self.preset.text.max_length)
        self.critic_dit = (critic or copy.deepcopy(teacher)).train().requires_grad_(True)
        self.critic = SinkDenoiser(self.critic_dit, self.preset.text.max_length)
        self.schedule = FlowMatchSchedule(gen.shift, gen.num_train_timesteps)
        self.rng = np.random.default_rng(seed)
        self.opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.critic_opt = torch.optim.AdamW(self.critic_dit.parameters(), lr=cfg.critic_lr, weight_decay=0.0)
        stride = self.preset.vae.temporal_stride
        needed = 1 + stride * (cfg.rollout_blocks * self.n - 1)
        if any(len(c.frames) < needed for c in clips):
            raise ValueError(f"rollouts of {cfg.rollout_blocks} blocks need clips of >= {needed} frames")

    def state_modules(self):
        return {"student": self.student, "critic": self.critic_dit}

    def optimizers(self):
        return {"student": self.opt, "critic": self.critic_opt}

    def rollout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One autoregressive rollout: (latents (1, C, F, h, w) with gradients at the exit steps, reference, audio)."""
        clip = self.clips[int(self.rng.integers(len(self.clips)))]
        with torch.no_grad():  # the sink and the prompt embedding: no gradients, as at inference
            # Latents only: nothing is decoded, so nothing is pasted back.
            settings = RenderSettings(seed=int(self.rng.integers(2**31)), paste_back=False)
            session = self.model.open(clip.portrait, None, settings)
        session.feed_audio(clip.audio, final=True)
        blocks = []
        for b in range(self.cfg.rollout_blocks):
            steps = session.plan.steps(b)
            blocks.append(session.next_latents(exit_step=int(self.rng.integers(steps))))
        latents = torch.cat(blocks, dim=2)
        self.last_resets = session.cache.resets  # URCR resets inside this rollout
        audio = self.model.featurizer.block_features(clip.audio, 0, latents.shape[2], self.preset.vae.temporal_stride)
        return latents, session.reference.detach(), audio[None]

    def pinned(self, window: slice) -> bool:
        """Whether this window of a rollout starts with block 0's pinned frame (the portrait's latent)."""
        return window.start == 0 and self.preset.generator.pin_first_frame

    def windows(self, frames: int) -> list[slice]:
        size = self.cfg.score_window_blocks * self.n
        return [slice(s, min(s + size, frames)) for s in range(0, frames, size)]

    def step(self, index: int) -> dict[str, float]:
        gen = self.preset.generator
        latents, reference, audio = self.rollout()
        first = gen.sink_frames
        # DMD: the student's frames move toward where the teacher's score points and away from the critic's.
        dmd = latents.new_zeros(())
        for w in self.windows(latents.shape[2]):
            x = latents[:, :, w]
            pinned = self.pinned(w)
            sigma = float(self.rng.uniform(self.cfg.min_sigma, self.cfg.max_sigma))
            with torch.no_grad():
                noisy = self.schedule.add_noise(x.detach(), torch.randn_like(x), sigma)
                if pinned:  # the pinned frame is given clean, as when block 0 was denoised
                    noisy = torch.cat([x[:, :, :1].detach(), noisy[:, :, 1:]], dim=2)
                t = self.schedule.timestep(torch.full((1, x.shape[2]), sigma))
                x0_real = self.schedule.predict_x0(noisy, self.teacher(noisy, t, reference, audio[:, w], first), sigma)
                x0_fake = self.schedule.predict_x0(noisy, self.critic(noisy, t, reference, audio[:, w], first), sigma)
                made = slice(1 if pinned else 0, None)  # the frames the student made
                normaliser = (x.detach() - x0_real)[:, :, made].abs().mean().clamp_min(1e-4)
                grad = (x0_fake - x0_real) / normaliser
            x, grad = x[:, :, made], grad[:, :, made]
            dmd = dmd + 0.5 * F.mse_loss(x, (x - grad).detach()) / len(self.windows(latents.shape[2]))
        self.opt.zero_grad(set_to_none=True)
        dmd.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        # The critic tracks the student's current output distribution (flow matching on its samples).
        generated = latents.detach()
        critic_loss = 0.0
        for _ in range(self.cfg.critic_steps):
            loss = 0.0
            for w in self.windows(generated.shape[2]):
                x = generated[:, :, w]
                sigmas = sample_sigmas(1, gen.shift)[:, None].expand(-1, x.shape[2])
                loss = loss + flow_matching_loss(
                    self.critic, self.schedule, x, sigmas, reference, audio[:, w], first, pinned_first=self.pinned(w)
                )
            self.critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic_dit.parameters(), 1.0)
            self.critic_opt.step()
            critic_loss = loss.item() / len(self.windows(generated.shape[2]))
        return {"dmd": dmd.item(), "critic": critic_loss, "resets": float(self.last_resets)}
