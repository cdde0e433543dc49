"""Flow matching with a timestep shift, and PSB step plans.

x_t = (1 - sigma) * x_0 + sigma * noise; the network predicts the velocity v = noise - x_0.
PSB (Progressive Step Bootstrapping, DESIGN 3.3) lives here: a step plan gives each block its number of denoising
steps. Every plan's noise levels are the same shift applied to an even grid of its step count, so plans whose counts
divide one another share levels: the 4 of a steady block (1, .938, .833, .625 at shift 5) are every other one of the
8 of block 0. A 6-step block (block 1 of 8, 6, 4) shares only 1 and .833 with them; the student meets its levels
because training rollouts run the same plan.
"""

from __future__ import annotations

import torch

from model.config import parse_step_plan


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan2.1's timestep shift: spends more of the steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowMatchSchedule:
    def __init__(self, shift: float, num_train_timesteps: int):
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps

    def sigmas(self, steps: int) -> torch.Tensor:
        """steps + 1 noise levels from 1 down to 0, shifted."""
        return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift).float()

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * self.num_train_timesteps

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(timestep, dtype=torch.float32) / self.num_train_timesteps

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return (1 - sigma) * x0 + sigma * noise

    @staticmethod
    def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return x_t - sigma * velocity


class StepPlan:
    """PSB: `plan[i]` denoising steps for block i; the last entry repeats for every later block."""

    def __init__(self, plan: tuple[int, ...] | list[int]):
        if not plan or any(int(s) < 1 for s in plan):
            raise ValueError(f"a step plan needs positive step counts, got {plan}")
        self.plan = tuple(int(s) for s in plan)

    def steps(self, block_index: int) -> int:
        return self.plan[min(block_index, len(self.plan) - 1)]

    @classmethod
    def parse(cls, value) -> StepPlan:
        """A plan as people write it ("8,6,4", [8, 6, 4], 4): `model.config.parse_step_plan`."""
        return cls(parse_step_plan(value))

    def __repr__(self) -> str:
        return f"StepPlan({list(self.plan)})"
