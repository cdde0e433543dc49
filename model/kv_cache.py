"""The streaming KV cache: a permanent sink plus a bounded window of recent latent frames, and URCR.

Keys are stored after RoPE, so a cached entry remembers the position it was written at. URCR (Unbounded RoPE via
Cache Reset, DESIGN 3.3) lives here: the cache hands out temporal positions, knows when the next block would pass the
trained horizon, and resets to the sink alone. The generator then re-writes its most recent frames at the positions
right after the sink, so positions stay in range and memory stays constant at any video length.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys/values laid out as [sink tokens | ring of `window_frames` frames of tokens].

    A write happens in two steps: every attention layer calls `write(layer, k, v)` during a forward pass with
    `write_cache=True`, then the caller calls `commit(num_frames)` once to advance the ring. The first commit fills
    the sink.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        sink_frames: int,
        window_frames: int,
        horizon_frames: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.tokens_per_frame = tokens_per_frame
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.horizon_frames = horizon_frames
        capacity = (sink_frames + window_frames) * tokens_per_frame
        shape = (num_layers, batch, capacity, num_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.sink_written = False
        self.window_filled = 0  # frames in the ring that hold data
        self.window_head = 0  # ring slot of the next frame written
        self.next_position = sink_frames  # temporal RoPE position of the next frame
        self.resets = 0
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- reading and writing (called by attention layers) -------------------------------------------------------

    @property
    def sink_tokens(self) -> int:
        return self.sink_frames * self.tokens_per_frame

    def valid_tokens(self) -> int:
        if not self.sink_written:
            return 0
        return self.sink_tokens + self.window_filled * self.tokens_per_frame

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.valid_tokens()
        return self.keys[layer, :, :n], self.values[layer, :, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._pending[layer] = (k, v)

    def commit(self, num_frames: int) -> None:
        """Store the pending writes of the last forward pass: the sink first, then frames into the ring."""
        if len(self._pending) != self.keys.shape[0]:
            raise RuntimeError(f"commit expects writes from all {self.keys.shape[0]} layers, got {len(self._pending)}")
        tokens = num_frames * self.tokens_per_frame
        if not self.sink_written:
            if num_frames != self.sink_frames:
                raise ValueError(f"the first write must be the {self.sink_frames}-frame sink, got {num_frames} frames")
            slots = torch.arange(tokens)
            self.sink_written = True
        else:
            if num_frames > self.window_frames:
                raise ValueError(f"cannot write {num_frames} frames into a {self.window_frames}-frame window")
            frame_slots = (self.window_head + torch.arange(num_frames)) % self.window_frames
            slots = (
                self.sink_tokens
                + frame_slots[:, None] * self.tokens_per_frame
                + torch.arange(self.tokens_per_frame)[None, :]
            ).reshape(-1)
            self.window_head = (self.window_head + num_frames) % self.window_frames
            self.window_filled = min(self.window_filled + num_frames, self.window_frames)
        slots = slots.to(self.keys.device)
        for layer, (k, v) in self._pending.items():
            if k.shape[1] != tokens:
                raise ValueError(
                    f"layer {layer}: wrote {k.shape[1]} tokens for {num_frames} frames ({tokens} expected)"
                )
            self.keys[layer].index_copy_(1, slots, k.to(self.keys.dtype))
            self.values[layer].index_copy_(1, slots, v.to(self.values.dtype))
        self._pending.clear()

    # -- URCR: positions and resets -----------------------------------------------------------------------------

    def fits(self, num_frames: int) -> bool:
        """Whether `num_frames` more frames stay inside the trained RoPE horizon."""
        return self.next_position + num_frames <= self.horizon_frames

    def allocate(self, num_frames: int) -> torch.Tensor:
        """Temporal positions for the next `num_frames` frames; they must fit (reset first otherwise)."""
        if not self.fits(num_frames):
            raise RuntimeError(
                f"positions {self.next_position}..{self.next_position + num_frames - 1} pass the horizon "
                f"{self.horizon_frames}: reset the cache first"
            )
        positions = torch.arange(self.next_position, self.next_position + num_frames)
        self.next_position += num_frames
        return positions

    def reset(self) -> None:
        """Drop every frame but the sink; positions restart right after it."""
        self.window_filled = 0
        self.window_head = 0
        self.next_position = self.sink_frames
        self.resets += 1

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
