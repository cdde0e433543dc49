"""Stage 2: the bidirectional audio- and reference-conditioned teacher, trained by flow matching (DESIGN 3.4.2).

Windows of latent frames follow the reference sink and sit at random temporal positions inside the trained horizon,
so the teacher scores any window a student rollout produces, before or after a URCR reset.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.config import Preset
from model.dit import CausalWanDiT
from model.scheduler import FlowMatchSchedule
from model.train.common import SinkDenoiser, flow_matching_loss, sample_sigmas
from model.train.data import LatentDataset


class DiTTrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: int = 8
    lr: float = 3e-4
    window_blocks: int = 2  # teacher windows: this many generation blocks of latent frames
    t_mci_max: float = 150.0  # student: context corrupted with t ~ U[0, t_mci_max] (MCI)
    context_weight: float = 0.25  # student: loss weight of the (lightly noised) context frames


def random_first_position(rng: np.random.Generator, frames: int, preset: Preset) -> int:
    """Positions [p, p + frames) with p >= sink_frames and p + frames <= horizon."""
    gen = preset.generator
    return int(rng.integers(gen.sink_frames, gen.horizon_frames - frames + 1))


class DiTStage:
    """What the flow-matching stages share: the DiT being trained, its data, optimizer and schedule."""

    name: str

    def __init__(
        self,
        dit: CausalWanDiT,
        data: LatentDataset,
        preset: Preset,
        cfg: DiTTrainConfig,
        seed: int = 0,
        model: torch.nn.Module | None = None,
    ):
        self.dit, self.data, self.preset, self.cfg = dit.train().requires_grad_(True), data, preset, cfg
        self.model = model or SinkDenoiser(dit, preset.text.max_length)  # a DDP wrapper of one under Ray Train
        self.schedule = FlowMatchSchedule(preset.generator.shift, preset.generator.num_train_timesteps)
        self.rng = np.random.default_rng(seed)
        self.opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)

    def state_modules(self):
        return {"dit": self.dit}

    def optimizers(self):
        return {"dit": self.opt}


class TeacherStage(DiTStage):
    name = "teacher"

    def step(self, index: int) -> dict[str, float]:
        frames = self.cfg.window_blocks * self.preset.generator.frames_per_block
        batch = self.data.sample(self.cfg.batch, frames, self.rng)
        sigmas = sample_sigmas(self.cfg.batch, self.preset.generator.shift)[:, None].expand(-1, frames)
        loss = flow_matching_loss(
            self.model,
            self.schedule,
            batch.latents,
            sigmas,
            batch.reference,
            batch.audio,
            random_first_position(self.rng, frames, self.preset),
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.dit.parameters(), 1.0)
        self.opt.step()
        return {"flow": loss.item()}
