"""The causal, audio-driven Wan2.1 diffusion transformer.

One set of weights, three attention modes:
- "bidirectional": every token sees every token (Wan2.1's own behaviour);
- "block_causal": the sequence is split into frame groups (sink, then blocks); a token sees its own group and
  all earlier ones, or with `window_frames` only the last that many frames ending with its group (training);
- "streaming": the input is one block per batch row; each row sees its own KV cache (sink + recent frames) and
  itself, and rows marked for writing have their keys/values written to their cache (generation). Rows of one
  pass may sit at different positions, cache lengths and timesteps: a continuously batched engine stacks them.

Parameter names follow the original Wan2.1 checkpoint (`blocks.N.self_attn.q`, `blocks.N.modulation`, `head.head`).
Conditioning modules (`cond_embedding`, `audio_*`) are new and start at zero, so a Wan2.1 checkpoint reproduces
Wan2.1 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DiTConfig
from model.kv_cache import KVCache
from model.rope import apply_rope, grid_positions, rope_cos_sin

AttentionMode = Literal["bidirectional", "block_causal", "streaming"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as Wan2.1 does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan2.1's timestep embedding: [cos | sin] of t * 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    angles = timesteps.double()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rowwise(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module` applied to each batch row on its own: for the network's small products (embeddings of a few frames'
    timesteps and audio, the patch convolution, a short text), whose kernels a CPU picks by the number of rows, so a
    row's numbers would otherwise depend on its batch mates. The large per-token products stack as they are."""
    if x.shape[0] == 1:
        return module(x)
    return torch.cat([module(row) for row in x.split(1)])


@dataclass
class Positions:
    """RoPE cos/sin for the tokens of one forward pass: (L, head_dim/2), or (B, L, head_dim/2) per batch row."""

    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class CacheAccess:
    """The KV caches of a streaming pass: one per batch row, and for each whether its keys/values are written."""

    caches: list[KVCache]
    write: list[bool]

    def __post_init__(self):
        if len(self.caches) != len(self.write):
            raise ValueError(f"{len(self.caches)} caches but {len(self.write)} write flags")


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, pos: Positions, mask: torch.Tensor | None, kv: CacheAccess | None
    ) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), pos.cos, pos.sin)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), pos.cos, pos.sin)
        v = self.v(x).unflatten(-1, heads)
        if kv is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)
        else:
            # Each row attends over its own cache (lengths differ between rows) and its own block.
            rows = []
            for b, (cache, write) in enumerate(zip(kv.caches, kv.write)):
                k_row, v_row = k[b : b + 1], v[b : b + 1]
                if write:
                    cache.write(self.layer, k_row, v_row)
                k_cached, v_cached = cache.read(self.layer)
                k_row = torch.cat([k_cached.to(k.dtype), k_row], dim=1)
                v_row = torch.cat([v_cached.to(v.dtype), v_row], dim=1)
                rows.append(
                    F.scaled_dot_product_attention(
                        q[b : b + 1].transpose(1, 2), k_row.transpose(1, 2), v_row.transpose(1, 2)
                    ).transpose(1, 2)
                )
            out = torch.cat(rows)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to a context sequence (text). Keys/values have their own width."""

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads).transpose(1, 2)
        k = self.norm_k(rowwise(self.k, context)).unflatten(-1, heads).transpose(1, 2)
        v = rowwise(self.v, context).unflatten(-1, heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))


class AudioCrossAttention(nn.Module):
    """Each latent frame's tokens attend to that frame's own audio window (DESIGN 3.2, the config alternative)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.audio_hidden, 2 * cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, frames: int) -> torch.Tensor:
        # x (B, F*S, dim) -> (B*F, heads, S, d); audio (B, F, A, audio_hidden) -> (B*F, heads, A, d)
        b = x.shape[0]
        q = self.q(x).unflatten(1, (frames, -1)).flatten(0, 1).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = self.kv(audio).flatten(0, 1).chunk(2, dim=-1)
        k = k.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.o(out.unflatten(0, (b, frames)).flatten(1, 2))


def per_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, F*S, dim) -> (B, F, S, dim): lets per-frame modulation broadcast over a frame's tokens."""
    return x.unflatten(1, (frames, -1))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, layer: int):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg, layer)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        # Audio enters the layers of `audio_layer_range`; zero-initialised so a Wan2.1 checkpoint is unchanged.
        self.takes_audio = layer in cfg.audio_layer_range
        if self.takes_audio and cfg.audio_injection == "add":
            self.audio_proj = nn.Linear(cfg.audio_hidden, cfg.dim)
            nn.init.zeros_(self.audio_proj.weight)
            nn.init.zeros_(self.audio_proj.bias)
        elif self.takes_audio:
            self.audio_attn = AudioCrossAttention(cfg)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        audio: torch.Tensor | None,
        frames: int,
        pos: Positions,
        mask: torch.Tensor | None,
        kv: CacheAccess | None,
    ) -> torch.Tensor:
        # e: (B, F, 6, dim) per-frame modulation from per-frame timesteps, broadcast over each frame's tokens.
        mod = (self.modulation.unsqueeze(0) + e.float()).unsqueeze(3)  # (B, F, 6, 1, dim)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(2)
        if audio is not None and self.takes_audio:
            if hasattr(self, "audio_proj"):
                # audio: (B, F, audio_hidden), one vector per latent frame added to that frame's tokens.
                x = (per_frame(x, frames) + rowwise(self.audio_proj, audio).unsqueeze(2)).flatten(1, 2)
            else:
                x = x + self.audio_attn(x, audio, frames)
        h = (per_frame(self.norm1(x).float(), frames) * (1 + scale_sa) + shift_sa).flatten(1, 2)
        y = self.self_attn(h.type_as(x), pos, mask, kv)
        x = (per_frame(x.float(), frames) + per_frame(y, frames) * gate_sa).flatten(1, 2).type_as(x)
        x = x + self.cross_attn(self.norm3(x), context)
        h = (per_frame(self.norm2(x).float(), frames) * (1 + scale_ff) + shift_ff).flatten(1, 2)
        y = self.ffn(h.type_as(x))
        return (per_frame(x.float(), frames) + per_frame(y.float(), frames) * gate_ff).flatten(1, 2).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.latent_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, frames: int) -> torch.Tensor:
        # t_emb: (B, F, dim) per frame.
        shift, scale = (self.modulation.unsqueeze(0) + t_emb.float().unsqueeze(2)).unsqueeze(3).unbind(2)
        h = (per_frame(self.norm(x).float(), frames) * (1 + scale) + shift).flatten(1, 2)
        return self.head(h.type_as(x))


class AudioEncoder(nn.Module):
    """Shared encoder of each latent frame's audio window (A feature vectors), run once per forward pass.

    "add" injection gets one `audio_hidden` vector per latent frame: the window flattened (frame-major), then either
    an MLP ("mlp") or OmniAvatar's AudioPack ("pack": one Linear, then LayerNorm). "cross_attn" gets the A vectors as
    tokens with a learned slot embedding.
    """

    PACK_NORM_EPS = 1e-5  # AudioPack's LayerNorm keeps torch's default eps

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.injection = cfg.audio_injection
        window_width = cfg.audio_window * cfg.audio_feature_dim
        if self.injection == "cross_attn":
            self.proj = nn.Sequential(
                nn.Linear(cfg.audio_feature_dim, cfg.audio_hidden),
                nn.SiLU(),
                nn.Linear(cfg.audio_hidden, cfg.audio_hidden),
            )
            self.slot = nn.Parameter(torch.zeros(cfg.audio_window, cfg.audio_hidden))
        elif cfg.audio_encoder == "pack":
            self.proj = nn.Linear(window_width, cfg.audio_hidden)
            self.norm = LayerNorm(cfg.audio_hidden, self.PACK_NORM_EPS, elementwise_affine=True)
        else:
            self.proj = nn.Sequential(
                nn.Linear(window_width, cfg.audio_hidden), nn.SiLU(), nn.Linear(cfg.audio_hidden, cfg.audio_hidden)
            )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if self.injection == "cross_attn":
            return self.proj(audio) + self.slot  # (B, F, A, audio_hidden)
        hidden = self.proj(audio.flatten(-2))  # (B, F, audio_hidden)
        return self.norm(hidden) if hasattr(self, "norm") else hidden


class CausalWanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(
            cfg.latent_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        # Conditioning (new, zero-initialised): reference latent | mask, and the audio encoder.
        self.cond_embedding = nn.Conv3d(
            cfg.cond_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        nn.init.zeros_(self.cond_embedding.weight)
        self.audio_encoder = AudioEncoder(cfg)

    # Modules that are not part of Wan2.1 (absent from its checkpoints).
    CONDITIONING_PREFIXES = ("cond_embedding.", "audio_encoder.")
    CONDITIONING_INFIXES = (".audio_proj.", ".audio_attn.")

    @classmethod
    def is_conditioning_param(cls, name: str) -> bool:
        return name.startswith(cls.CONDITIONING_PREFIXES) or any(s in name for s in cls.CONDITIONING_INFIXES)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """(B, Lt, text_dim) encoder output -> (B, Lt, dim). Constant over a render: compute it once."""
        return self.text_embedding(context)

    def forward(
        self,
        latents: torch.Tensor,  # (B, C, F, H, W) noisy latents
        timesteps: torch.Tensor,  # (B, F) per latent frame, in [0, num_train_timesteps]
        text: torch.Tensor,  # (B, Lt, dim) from embed_text
        frame_positions: torch.Tensor,  # (F,) temporal RoPE positions, or (B, F) per row
        cond: torch.Tensor | None = None,  # (B, cond_channels, F, H, W) reference latent | mask
        audio: torch.Tensor | None = None,  # (B, F, audio_window, audio_feature_dim)
        *,
        attention: AttentionMode = "bidirectional",
        frame_groups: list[int] | None = None,  # block_causal: frames per group, e.g. [1, 3, 3, 3]
        window_frames: int | None = None,  # block_causal: keys only from the last this many frames of the group
        cache: KVCache | list[KVCache] | None = None,  # streaming: one cache per batch row
        write_cache: bool | list[bool] = False,  # streaming: write the row's keys/values into its cache
    ) -> torch.Tensor:
        cfg = self.cfg
        b, _, frames, height, width = latents.shape
        pf, ph, pw = cfg.patch_size
        grid = (frames // pf, height // ph, width // pw)

        x = rowwise(self.patch_embedding, latents)
        if cond is not None:
            x = x + rowwise(self.cond_embedding, cond.to(x.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, L, dim)
        tokens_per_frame = grid[1] * grid[2]

        t_emb = rowwise(self.time_embedding, sinusoidal_embedding(timesteps, cfg.freq_dim).to(x.dtype))  # (B, F, dim)
        e = rowwise(self.time_projection, t_emb).unflatten(-1, (6, cfg.dim))  # (B, F, 6, dim)

        pos = self._positions(frame_positions.to(x.device), grid)
        kv = self._cache_access(attention, cache, write_cache, b)
        mask = self._attention_mask(attention, frame_groups, window_frames, grid[0], tokens_per_frame, x.device)
        audio_h = rowwise(self.audio_encoder, audio.to(x.dtype)) if audio is not None else None

        for block in self.blocks:
            x = block(x, e, text, audio_h, grid[0], pos, mask, kv)
        x = self.head(x, t_emb, grid[0])
        return self._unpatchify(x, grid)

    def _positions(self, frame_positions: torch.Tensor, grid: tuple[int, int, int]) -> Positions:
        cfg = self.cfg
        rows = frame_positions if frame_positions.ndim == 2 else frame_positions[None]
        cos, sin = zip(
            *(
                rope_cos_sin(grid_positions(p, grid[1], grid[2]), cfg.rope_dims, cfg.rope_theta, cfg.rope_max_positions)
                for p in rows
            )
        )
        if frame_positions.ndim == 2:
            return Positions(torch.stack(cos), torch.stack(sin))
        return Positions(cos[0], sin[0])

    @staticmethod
    def _cache_access(
        attention: AttentionMode, cache: KVCache | list[KVCache] | None, write: bool | list[bool], batch: int
    ) -> CacheAccess | None:
        if attention != "streaming":
            if cache is not None:
                raise ValueError(f"{attention} attention does not use a KV cache")
            return None
        if cache is None:
            raise ValueError("streaming attention needs a KV cache")
        caches = [cache] if isinstance(cache, KVCache) else list(cache)
        writes = [write] * len(caches) if isinstance(write, bool) else list(write)
        if len(caches) != batch:
            raise ValueError(f"streaming needs one KV cache per batch row: {len(caches)} for {batch} rows")
        return CacheAccess(caches, writes)

    @staticmethod
    def _attention_mask(
        attention: AttentionMode,
        frame_groups: list[int] | None,
        window_frames: int | None,
        frames: int,
        tokens_per_frame: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        if attention != "block_causal":
            return None  # bidirectional: all tokens; streaming: the row's whole cache and its own block
        if not frame_groups or sum(frame_groups) != frames:
            raise ValueError(f"block_causal needs frame_groups summing to {frames} frames, got {frame_groups}")
        # Per frame: the end (exclusive) of its group. A query frame sees key frames before its group's end, and with
        # a window only the last `window_frames` of them (LiveTalk's training mask).
        sizes = torch.tensor(frame_groups, device=device)
        group_end = torch.repeat_interleave(torch.cumsum(sizes, 0), sizes)
        key = torch.arange(frames, device=device)
        visible = key[None, :] < group_end[:, None]
        if window_frames is not None:
            visible &= key[None, :] >= group_end[:, None] - window_frames
        per_token = torch.repeat_interleave(visible, tokens_per_frame, dim=0)
        return torch.repeat_interleave(per_token, tokens_per_frame, dim=1)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pf, ph, pw = self.cfg.patch_size
        c = self.cfg.latent_channels
        x = x.view(x.shape[0], *grid, pf, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F, pf, H, ph, W, pw)
        return x.reshape(x.shape[0], c, grid[0] * pf, grid[1] * ph, grid[2] * pw)

    def backbone_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not self.is_conditioning_param(n))

    def new_cache(
        self,
        *,
        tokens_per_frame: int,
        sink_frames: int,
        window_frames: int,
        horizon_frames: int,
        device=None,
        dtype=None,
    ) -> KVCache:
        """An empty KV cache for one render (one batch row) of this network."""
        p = next(self.parameters())
        return KVCache(
            num_layers=self.cfg.num_layers,
            num_heads=self.cfg.num_heads,
            head_dim=self.cfg.head_dim,
            tokens_per_frame=tokens_per_frame,
            sink_frames=sink_frames,
            window_frames=window_frames,
            horizon_frames=horizon_frames,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )
