"""Pieces every DiT stage shares: the [sink | frames] sequence as the generator sees it, and the flow-matching loss.

Training supports the generator's `sink="reference"` with `mask="reference_entry"` (this project's models), with or
without `pin_first_frame`. A pinned frame is what the generator makes of block 0's latent frame 0: the portrait's
latent, clean, at the block's timestep and mask like its neighbours (`RenderSession.block_passes`). It is never
noised while its block is denoised, and it carries no loss: the model is never asked to generate it.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import Preset
from model.dit import CausalWanDiT
from model.scheduler import FlowMatchSchedule, shift_sigma
from model.train.data import conditioning


def check_trainable(preset: Preset) -> None:
    """The conditioning layouts the training stages build (a clear error instead of a silently different model)."""
    gen = preset.generator
    if gen.sink != "reference" or gen.mask != "reference_entry":
        raise ValueError(
            f"training builds sink='reference' with mask='reference_entry'; the preset has sink={gen.sink!r}, "
            f"mask={gen.mask!r}"
        )


def pin_first_frames(latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Windows that start a render, with latent frame 0 replaced by the portrait's latent (pin_first_frame)."""
    return torch.cat([reference.to(latents.dtype), latents[:, :, 1:]], dim=2)


class SinkDenoiser(nn.Module):
    """The DiT on [reference sink | noisy frames], laid out exactly as the generator does; returns the frames' output.

    The sink is the reference latent at t = 0 with mask 1 and silent audio at position 0 (`_write_sink`); the frames
    carry mask 0 and sit at positions first_position, first_position + 1, ... One module, so DDP can wrap it whole.
    Presets without a text encoder embed every prompt as zeros (NullTextEncoder); that embedding is learned too.
    """

    def __init__(self, dit: CausalWanDiT, text_length: int):
        super().__init__()
        self.dit, self.text_length = dit, text_length

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        reference: torch.Tensor,
        audio: torch.Tensor,
        first_position: int,
        attention: str = "bidirectional",
        frame_groups: list[int] | None = None,
    ) -> torch.Tensor:
        dit = self.dit
        b, _, f = noisy.shape[:3]
        x = torch.cat([reference, noisy], dim=2)
        t = torch.cat([torch.zeros(b, 1, device=noisy.device), timesteps], dim=1)
        cond = torch.cat([conditioning(reference, 1, True), conditioning(reference, f, False)], dim=2)
        audio = torch.cat([torch.zeros_like(audio[:, :1]), audio], dim=1)
        positions = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(f) + int(first_position)])
        groups = [1, *frame_groups] if frame_groups is not None else None
        text = dit.embed_text(noisy.new_zeros(b, self.text_length, dit.cfg.text_dim))
        out = dit(x, t, text, positions, cond, audio, attention=attention, frame_groups=groups)
        return out[:, :, 1:]


def sample_sigmas(batch: int, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training noise levels: uniform, then shifted as the sampler's schedule is (more weight at high noise)."""
    return shift_sigma(torch.rand(batch, generator=generator, dtype=torch.float64), shift).float()


def flow_matching_loss(
    denoiser: nn.Module,
    schedule: FlowMatchSchedule,
    clean: torch.Tensor,
    sigmas: torch.Tensor,
    reference: torch.Tensor,
    audio: torch.Tensor,
    first_position: int,
    attention: str = "bidirectional",
    frame_groups: list[int] | None = None,
    weights: torch.Tensor | None = None,
    pinned_first: bool = False,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0). sigmas: (B, F) per frame.

    `pinned_first`: frame 0 is a pinned frame (module docstring): given clean at its sigma's timestep, no loss."""
    noise = torch.randn_like(clean)
    s = sigmas[:, None, :, None, None]
    noisy = schedule.add_noise(clean, noise, s)
    w = (
        torch.ones(clean.shape[0], clean.shape[2], device=clean.device)
        if weights is None
        else weights.expand(clean.shape[0], -1)
    )
    if pinned_first:
        noisy = torch.cat([clean[:, :, :1], noisy[:, :, 1:]], dim=2)
        w = torch.cat([torch.zeros_like(w[:, :1]), w[:, 1:]], dim=1)
    velocity = denoiser(noisy, schedule.timestep(sigmas), reference, audio, first_position, attention, frame_groups)
    err = (velocity.float() - (noise - clean)).pow(2).mean(dim=(1, 3, 4))  # (B, F)
    return (err * w).sum() / w.sum().clamp_min(1e-8)
