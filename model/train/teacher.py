"""Stage 2: the bidirectional audio- and reference-conditioned teacher, trained by flow matching (DESIGN 3.4.2).

Windows of latent frames follow the reference sink and sit at random temporal positions inside the trained horizon,
so the teacher scores any window a student rollout produces, before or after a URCR reset.

A teacher cannot stream, so it has its own sampler (`sample_teacher`), and its held-out evaluation is the
evaluation command's with that sampler:

    python -m model.train.teacher --checkpoint runs/tiny/teacher_model --steps 32 --clips 4 --seconds 8 \
        --out runs/tiny/eval/teacher-32-steps.json
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.audio_features import num_video_frames
from model.config import Preset
from model.deflicker import deflicker_video
from model.dit import CausalWanDiT
from model.eval import heldout
from model.generator import AvatarModel
from model.scheduler import FlowMatchSchedule
from model.synth import Clip
from model.train.common import SinkDenoiser, check_trainable, flow_matching_loss, pin_first_frames, sample_sigmas
from model.train.data import Batch, LatentDataset
from model.vae import frames_to_tensor, tensor_to_frames


class DiTTrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    batch: int = 8
    lr: float = 3e-4
    window_blocks: int = 2  # teacher windows: this many generation blocks of latent frames
    t_mci_max: float = 150.0  # student: context corrupted with t ~ U[0, t_mci_max] (MCI)
    context_weight: float = 0.25  # student: loss weight of the (lightly noised) context frames
    # This fraction of the batches are a render's start: windows from each clip's first latent frame, at the first
    # block's positions (right after the sink). A random window starts there about once in 20 otherwise.
    first_block_fraction: float = 0.25


def random_first_position(rng: np.random.Generator, frames: int, preset: Preset) -> int:
    """Positions [p, p + frames) with p >= sink_frames and p + frames <= horizon."""
    gen = preset.generator
    return int(rng.integers(gen.sink_frames, gen.horizon_frames - frames + 1))


def sample_windows(stage: DiTStage, frames: int) -> tuple[Batch, int, bool]:
    """A batch of windows, the temporal position of their first frame, and whether they start a render: a render's
    first frames at the first block's positions (`first_block_fraction` of the time; latent frame 0 is then the
    portrait's when the preset pins it), else random windows at random positions."""
    if stage.rng.random() < stage.cfg.first_block_fraction:
        batch = stage.data.sample(stage.cfg.batch, frames, stage.rng, from_start=True)
        if stage.preset.generator.pin_first_frame:
            batch = Batch(pin_first_frames(batch.latents, batch.reference), batch.reference, batch.audio)
        return batch, stage.preset.generator.sink_frames, True
    batch = stage.data.sample(stage.cfg.batch, frames, stage.rng)
    return batch, random_first_position(stage.rng, frames, stage.preset), False


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
        check_trainable(preset)
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
        batch, first_position, starts = sample_windows(self, frames)
        sigmas = sample_sigmas(self.cfg.batch, self.preset.generator.shift)[:, None].expand(-1, frames)
        loss = flow_matching_loss(
            self.model,
            self.schedule,
            batch.latents,
            sigmas,
            batch.reference,
            batch.audio,
            first_position,
            pinned_first=starts and self.preset.generator.pin_first_frame,
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.dit.parameters(), 1.0)
        self.opt.step()
        return {"flow": loss.item()}


@torch.no_grad()
def sample_teacher(
    model: AvatarModel, clip: Clip, steps: int, window_frames: int, seed: int, deflicker: bool = True
) -> np.ndarray:
    """A bidirectional teacher's video: independent windows of `window_frames` latent frames after the sink, each at
    the positions the teacher was trained on, integrated with `steps` Euler steps (the first window's frame 0 pinned
    to the portrait's latent when the preset pins it, as the generator's block 0); decoded as one clip (then the
    preset's deflicker, as the generator would apply it)."""
    preset, dit = model.preset, model.dit
    stride = preset.vae.temporal_stride
    # Latent frames of the clip, from its audio as the generator counts them (a photo's clip has no frames).
    total = 1 + (num_video_frames(len(clip.audio), clip.sample_rate, clip.fps) - 1) // stride
    reference = model.vae.encode(frames_to_tensor(clip.portrait[None]))
    audio = model.featurizer.block_features(clip.audio, 0, total, stride)[None]
    denoiser = SinkDenoiser(dit, preset.text.max_length)
    schedule = FlowMatchSchedule(preset.generator.shift, preset.generator.num_train_timesteps)
    sigmas = schedule.sigmas(steps).tolist()
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, total, window_frames):
        n = min(window_frames, total - start)
        x = torch.randn(
            1, preset.dit.latent_channels, n, preset.latent_height, preset.latent_width, generator=generator
        )
        pin = start == 0 and preset.generator.pin_first_frame
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            if pin:
                x = pin_first_frames(x, reference)
            t = schedule.timestep(torch.full((1, n), sigma))
            x = x + (sigma_next - sigma) * denoiser(
                x, t, reference, audio[:, start : start + n], preset.generator.sink_frames
            )
        latents.append(pin_first_frames(x, reference) if pin else x)
    video = model.vae.decode(torch.cat(latents, dim=2)).clamp(-1.0, 1.0)
    if deflicker:
        video = deflicker_video(video, stride, preset.generator.deflicker)
    return tensor_to_frames(video)


def main(argv: list[str] | None = None) -> None:
    parser = heldout.build_parser("Evaluate a bidirectional teacher checkpoint on the held-out clips")
    parser.add_argument("--steps", type=int, default=32, help="Euler steps per window")
    args = parser.parse_args(argv)
    window = DiTTrainConfig().window_blocks  # the teacher's training window, in generation blocks

    def render(model: AvatarModel, clip: Clip, index: int) -> np.ndarray:
        frames = window * model.preset.generator.frames_per_block
        return sample_teacher(model, clip, args.steps, frames, seed=index, deflicker=not args.no_deflicker)

    command = "python -m model.train.teacher " + " ".join(sys.argv[1:] if argv is None else argv)
    heldout.run(args, command, render=render, sampler=f"teacher, {args.steps} Euler steps")


if __name__ == "__main__":
    main()
