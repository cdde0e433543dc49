"""Stage 3: the causal student, initialised from the teacher (DESIGN 3.4.3).

Block-causal attention over [sink | context blocks | target block]: each block sees itself and everything before it,
as a block sees the KV cache at generation. The context blocks are what the cache would hold, corrupted as MCI does
with t ~ U[0, t_mci_max]; the target block is at a random noise level. The number of context blocks varies from 0
(the first block, sink only) to a full cache window, at random positions inside the horizon.
"""

from __future__ import annotations

import copy

import torch

from model.dit import CausalWanDiT
from model.train.common import flow_matching_loss, sample_sigmas
from model.train.teacher import DiTStage, sample_windows


def student_from_teacher(teacher: CausalWanDiT) -> CausalWanDiT:
    return copy.deepcopy(teacher)


class StudentStage(DiTStage):
    name = "student"

    def step(self, index: int) -> dict[str, float]:
        gen = self.preset.generator
        n = gen.frames_per_block
        context_blocks = int(self.rng.integers(gen.window_frames // n + 1))
        frames = (context_blocks + 1) * n
        batch, first_position, starts = sample_windows(self, frames)
        b = self.cfg.batch
        t_max = self.cfg.t_mci_max / gen.num_train_timesteps
        context = torch.rand(b, context_blocks) * t_max  # MCI: one corruption level per context block
        target = sample_sigmas(b, gen.shift)[:, None]
        sigmas = torch.cat([context.repeat_interleave(n, dim=1), target.expand(-1, n)], dim=1)
        weights = torch.cat([torch.full((context_blocks * n,), self.cfg.context_weight), torch.ones(n)])
        weights = weights * frames / weights.sum()
        loss = flow_matching_loss(
            self.model,
            self.schedule,
            batch.latents,
            sigmas,
            batch.reference,
            batch.audio,
            first_position,
            attention="block_causal",
            frame_groups=[n] * (context_blocks + 1),
            weights=weights,
            # Block 0 as the target: its pinned frame is given. As context it is data like any other (the generator
            # writes block 0 MCI-noised, pinned frame included).
            pinned_first=starts and context_blocks == 0 and gen.pin_first_frame,
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.dit.parameters(), 1.0)
        self.opt.step()
        return {"flow": loss.item()}
