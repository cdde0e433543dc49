"""The streaming KV cache of one render: a sink that is never evicted plus a bounded window of recent latent frames,
and URCR.

Keys are stored after RoPE, so a cached entry remembers the position it was written at, and the order of entries
does not matter to attention. The first `sink_frames` frames ever written fill the sink (the portrait's latent for
this project's models; the first frames of the video for LiveTalk); every later frame goes into a ring of
`window_frames` frames that evicts the oldest. This is LiveTalk's eviction rule (keep the first frames, drop the
oldest of the rest) in a layout that never moves data.

URCR (Unbounded RoPE via Cache Reset, DESIGN 3.3) lives here: the cache hands out temporal positions, knows when the
next block would pass the trained horizon, and resets to the sink alone. The generator then re-writes its most recent
frames at the positions right after the sink, so positions stay in range and memory stays constant at any length.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys/values laid out as [sink frames | ring of `window_frames` frames], in tokens.

    A write happens in two steps: every attention layer calls `write(layer, k, v)` during a forward pass that writes,
    then the caller calls `commit(num_frames)` once to store them (sink first, then the ring).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        sink_frames: int,
        window_frames: int,
        horizon_frames: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if sink_frames < 0 or window_frames < 0 or sink_frames + window_frames < 1:
            raise ValueError(f"need a cache of at least one frame, got sink {sink_frames} and window {window_frames}")
        self.tokens_per_frame = tokens_per_frame
        self.sink_frames = sink_frames
        self.window_frames = window_frames
        self.horizon_frames = horizon_frames
        capacity = (sink_frames + window_frames) * tokens_per_frame
        shape = (num_layers, 1, capacity, num_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.sink_filled = 0  # frames of the sink that hold data
        self.window_filled = 0  # frames of the ring that hold data
        self.window_head = 0  # ring slot of the next frame written
        self.next_position = 0  # temporal RoPE position of the next frame
        self.resets = 0
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- reading and writing (called by attention layers) -------------------------------------------------------

    @property
    def sink_tokens(self) -> int:
        return self.sink_frames * self.tokens_per_frame

    def valid_tokens(self) -> int:
        """Tokens that hold data; the ring only fills once the sink is full, so they are a prefix."""
        return (self.sink_filled + self.window_filled) * self.tokens_per_frame

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.valid_tokens()
        return self.keys[layer, :, :n], self.values[layer, :, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._pending[layer] = (k, v)

    def commit(self, num_frames: int) -> None:
        """Store the pending writes of the last forward pass, frame by frame: into the sink until it is full, then
        into the ring (a ring of 0 frames keeps nothing past the sink)."""
        if len(self._pending) != self.keys.shape[0]:
            raise RuntimeError(f"commit expects writes from all {self.keys.shape[0]} layers, got {len(self._pending)}")
        tokens = num_frames * self.tokens_per_frame
        sink_part = min(num_frames, self.sink_frames - self.sink_filled)
        ring_part = num_frames - sink_part
        kept = min(ring_part, self.window_frames)  # a longer write keeps only its last `window_frames` frames
        source_frames = list(range(sink_part)) + list(range(num_frames - kept, num_frames))
        slot_frames = list(range(self.sink_filled, self.sink_filled + sink_part)) + [
            self.sink_frames + (self.window_head + ring_part - kept + i) % self.window_frames for i in range(kept)
        ]
        source = self._frame_tokens(torch.tensor(source_frames, dtype=torch.long))
        slots = self._frame_tokens(torch.tensor(slot_frames, dtype=torch.long))
        for layer, (k, v) in self._pending.items():
            if k.shape[1] != tokens:
                raise ValueError(
                    f"layer {layer}: wrote {k.shape[1]} tokens for {num_frames} frames ({tokens} expected)"
                )
            src = source.to(k.device)
            self.keys[layer].index_copy_(1, slots.to(self.keys.device), k[:, src].to(self.keys.dtype))
            self.values[layer].index_copy_(1, slots.to(self.keys.device), v[:, src].to(self.values.dtype))
        self._pending.clear()
        self.sink_filled += sink_part
        if self.window_frames:
            self.window_head = (self.window_head + ring_part) % self.window_frames
        self.window_filled = min(self.window_filled + ring_part, self.window_frames)

    def _frame_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames[:, None] * self.tokens_per_frame + torch.arange(self.tokens_per_frame)[None, :]).reshape(-1)

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
        if self.sink_filled < self.sink_frames:
            raise RuntimeError("a cache reset needs a full sink (the horizon is shorter than the sink)")
        self.window_filled = 0
        self.window_head = 0
        self.next_position = self.sink_frames
        self.resets += 1
