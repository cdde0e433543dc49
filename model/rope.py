"""3D rotary position embedding with explicit positions (Wan2.1's frame/height/width split).

Wan2.1 derives positions from the grid; a streaming generator must choose them itself (URCR keeps temporal
positions inside the trained horizon), so here every token carries an explicit (frame, row, column) position.
"""

from __future__ import annotations

import torch


def axis_frequencies(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of one axis: dim/2 values, float64 as in Wan2.1."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def grid_positions(frame_positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(F*H*W, 3) integer positions in token order (frame-major, then row, then column)."""
    f = frame_positions.long().view(-1, 1, 1).expand(-1, height, width)
    h = torch.arange(height, device=f.device).view(1, -1, 1).expand_as(f)
    w = torch.arange(width, device=f.device).view(1, 1, -1).expand_as(f)
    return torch.stack([f, h, w], dim=-1).reshape(-1, 3)


def rope_cos_sin(
    positions: torch.Tensor, rope_dims: tuple[int, int, int], theta: float, max_positions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (L, head_dim/2) for integer positions (L, 3)."""
    if positions.numel() and (positions.min() < 0 or positions.max() >= max_positions):
        raise ValueError(f"RoPE positions must lie in [0, {max_positions}), got {positions.min()}..{positions.max()}")
    angles = torch.cat(
        [
            positions[:, i : i + 1].double() * axis_frequencies(d, theta).to(positions.device)
            for i, d in enumerate(rope_dims)
        ],
        dim=-1,
    )
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, L, heads, head_dim) by per-token angles (L, head_dim/2), or by
    per-row angles (B, L, head_dim/2) when the rows of a batch sit at different positions."""
    x_pairs = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = (cos[None], sin[None]) if cos.ndim == 2 else (cos, sin)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
