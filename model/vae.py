"""Wan2.1's causal 3D VAE (diffusers AutoencoderKLWan) with latent normalisation and block-wise streaming decode.

Video (B, 3, T, H, W) in [-1, 1], T = 1 + s*k  <->  latents (B, z, 1 + k, H/8, W/8). Video frame 0 maps to
latent frame 0 and latent frame k >= 1 to video frames s*k-s+1 .. s*k (s = temporal stride, 4).
Latents are normalised per channel, z_norm = (z - mean) / std, when the config gives mean and std.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import DeflickerConfig, VAEConfig
from model.deflicker import blend_crossing

WEIGHTS_NAME = "vae.safetensors"
CONFIG_NAME = "vae_config.json"


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (1, 3, T, H, W) in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]
    return video.float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float (1, 3, T, H, W) or (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"tensor_to_frames takes one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W), got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _diffusers_kwargs(config: VAEConfig) -> dict:
    kwargs = dict(
        base_dim=config.base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temperal_downsample),
        scale_factor_temporal=config.temporal_stride,
        scale_factor_spatial=config.spatial_stride,
    )
    if config.latents_mean is not None and config.latents_std is not None:
        kwargs.update(latents_mean=list(config.latents_mean), latents_std=list(config.latents_std))
    return kwargs


def residual_temporal_convs(model: nn.Module) -> list[nn.Conv3d]:
    """The causal 3D convs of an AutoencoderKLWan other than the resamplers' time convs: the ones the tiny VAE keeps
    frame-local (`model.train.vae.zero_temporal_taps`)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1 and "time_conv" not in name
    ]


def _causal_conv_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """WanCausalConv3d.forward, as a 2D conv of every frame on its own whenever that is exactly the same: a single
    frame with no cache (causal padding puts zeros before it), or past taps that are all zero (the frame-local tiny
    VAE). A third of the arithmetic of the 3D conv; any other case runs the 3D conv."""
    past = self.weight[:, :, :-1]
    if (cache_x is None and x.shape[2] == 1) or not torch.count_nonzero(past):
        b, c, t, h, w = x.shape
        pad_w, pad_h = self._padding[0], self._padding[2]
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        y = F.conv2d(frames, self.weight[:, :, -1], self.bias, padding=(pad_h, pad_w))
        return y.reshape(b, t, -1, h, w).transpose(1, 2)
    return type(self).forward(self, x, cache_x)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm.forward with the L2 norm taken as a sum of squares and an rsqrt: the same numbers to float
    rounding (F.normalize's eps 1e-12 on the norm is 1e-24 on its square), several times faster on a CPU, where
    F.normalize over the channel axis of a (B, C, T, H, W) tensor cost as much as the convolutions."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dim = 1 if self.channel_first else -1
    normalized = (wide * torch.rsqrt((wide * wide).sum(dim, keepdim=True).clamp_min(1e-24))).to(x.dtype)
    return normalized * self.scale * self.gamma + self.bias


class WanVAE(nn.Module):
    """AutoencoderKLWan built from a VAEConfig; encode -> normalised posterior mean, decode -> video."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKLWan

        if (config.latents_mean is None) != (config.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together")
        if config.latents_mean is not None and not len(config.latents_mean) == len(config.latents_std) == config.z_dim:
            raise ValueError(f"latents_mean/std must have z_dim = {config.z_dim} entries")
        self.config = config
        self.model = AutoencoderKLWan(**_diffusers_kwargs(config))
        # Same weights and results (to float rounding), less work: diffusers' modules with faster forwards.
        for conv in residual_temporal_convs(self.model):
            conv.forward = types.MethodType(_causal_conv_forward, conv)
        for norm in (m for m in self.model.modules() if type(m).__name__ == "WanRMS_norm"):
            norm.forward = types.MethodType(_rms_norm_forward, norm)
        normalised = config.latents_mean is not None
        mean = torch.tensor(config.latents_mean) if normalised else torch.zeros(config.z_dim)
        std = torch.tensor(config.latents_std) if normalised else torch.ones(config.z_dim)
        # Shaped to broadcast over (B, z, T, h, w); not saved: the config is their source of truth.
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)

    @property
    def temporal_stride(self) -> int:
        return self.config.temporal_stride

    @property
    def spatial_stride(self) -> int:
        return self.config.spatial_stride

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def num_latent_frames(self, num_video_frames: int) -> int:
        return 1 + (num_video_frames - 1) // self.temporal_stride

    def num_video_frames(self, num_latent_frames: int) -> int:
        return 1 + (num_latent_frames - 1) * self.temporal_stride

    def set_latent_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> VAEConfig:
        """Fix the per-channel latent statistics once a VAE is trained (Wan2.1's latents_mean/std); returns the
        config that now describes this VAE. Diffusion trains on z_norm = (z - mean) / std, about unit variance."""
        mean = tuple(round(float(v), 4) for v in mean)
        std = tuple(round(float(v), 4) for v in std)
        self.config = self.config.model_copy(update={"latents_mean": mean, "latents_std": std})
        self.latents_mean.copy_(torch.tensor(mean).view_as(self.latents_mean))
        self.latents_std.copy_(torch.tensor(std).view_as(self.latents_std))
        return self.config

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latents_std.to(latents.dtype) + self.latents_mean.to(latents.dtype)

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        _, _, t, h, w = video.shape
        if (t - 1) % self.temporal_stride:
            raise ValueError(f"video frames must be 1 + {self.temporal_stride}k, got {t}")
        if h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(f"video size {h}x{w} must be a multiple of {self.spatial_stride}")

    def posterior(self, video: torch.Tensor):
        """diffusers' DiagonalGaussianDistribution over raw (unnormalised) latents, for VAE training."""
        self._check_video(video)
        return self.model.encode(video.to(self.dtype)).latent_dist

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, 1+s*k, H, W) in [-1, 1] -> normalised posterior mean (B, z, 1+k, H/8, W/8)."""
        return self.normalize(self.posterior(video).mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z, n, h, w) -> video (B, 3, 1+s*(n-1), 8h, 8w) in [-1, 1], all at once."""
        return self.model.decode(self.denormalize(latents.to(self.dtype))).sample

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> WanVAE:
        """Load a diffusers-format AutoencoderKLWan directory (config.json + weights), e.g. Wan2.1's `vae/`."""
        from diffusers import AutoencoderKLWan

        pretrained = AutoencoderKLWan.from_pretrained(os.fspath(model_dir), local_files_only=True)
        cfg = pretrained.config
        if cfg.get("is_residual", False) or cfg.get("patch_size") is not None or cfg.get("attn_scales"):
            raise ValueError(f"{model_dir} is not a Wan2.1-style VAE (residual/patched/attn_scales variant)")
        config = VAEConfig(
            base_dim=cfg.base_dim,
            z_dim=cfg.z_dim,
            dim_mult=tuple(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks,
            temperal_downsample=tuple(cfg.temperal_downsample),
            latents_mean=tuple(cfg.latents_mean) if cfg.get("latents_mean") else None,
            latents_std=tuple(cfg.latents_std) if cfg.get("latents_std") else None,
        )
        vae = cls(config)
        vae.model.load_state_dict(pretrained.state_dict())
        return vae.to(pretrained.dtype)

    def save(self, directory: str | os.PathLike) -> None:
        """Our format: vae.safetensors (weights) + vae_config.json (the VAEConfig)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            f.write(self.config.model_dump_json(indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> WanVAE:
        from safetensors.torch import load_file

        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = VAEConfig.model_validate(json.load(f))
        vae = cls(config)
        vae.model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device)))
        return vae.to(device)


class StreamingDecoder:
    """Decode latents block by block with the decoder's causal-conv cache carried between blocks.

    Equivalent to one full `vae.decode` of all blocks concatenated (then `deflicker_video` when `deflicker` is
    given): the first latent frame of the stream yields 1 video frame, every later one `temporal_stride` frames.
    The cache (the last 2 time steps of every causal conv's input, and the last decoded frame for the deflicker)
    is held here, not in the VAE, so one VAE can serve several streams.
    """

    def __init__(self, vae: WanVAE, deflicker: DeflickerConfig | None = None):
        self.vae = vae
        self.deflicker = deflicker or DeflickerConfig()
        self._num_convs = vae.model._cached_conv_counts["decoder"]
        self.reset()

    def reset(self) -> None:
        """Start a new stream: the next latent frame is frame 0 again."""
        self._feat_cache: list = [None] * self._num_convs
        self._last_frame: torch.Tensor | None = None  # as decoded, before the deflicker
        self.latent_frames_decoded = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z, n, h, w) -> video (B, 3, m, 8h, 8w) in [-1, 1].

        m = 1 + s*(n-1) for the stream's first block, s*n afterwards.
        """
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim:
            raise ValueError(f"latents must be (B, {self.vae.config.z_dim}, n, h, w), got {tuple(latents.shape)}")
        model = self.vae.model
        x = model.post_quant_conv(self.vae.denormalize(latents.to(self.vae.dtype)))  # 1x1x1: no time cache
        frames = []
        # As diffusers' AutoencoderKLWan._decode, one latent frame at a time, but the cache is never cleared.
        for i in range(x.shape[2]):
            conv_idx = [0]
            first = self.latent_frames_decoded == 0
            chunk = model.decoder(
                x[:, :, i : i + 1], feat_cache=self._feat_cache, feat_idx=conv_idx, first_chunk=first
            ).clamp(-1.0, 1.0)
            frames.append(chunk if first else blend_crossing(self._last_frame, chunk, self.deflicker))
            self._last_frame = chunk[:, :, -1:]
            self.latent_frames_decoded += 1
        return torch.cat(frames, dim=2)
