"""Typed configuration of the network, the VAE, the encoders and the generator.

Every shape in `model/` is derived from these objects; presets are plain functions returning them.
`wan2.1-1.3b` is Wan2.1-T2V-1.3B exactly (plus zero-initialised conditioning); `tiny` is the same
code at a size that trains and renders on a 2-core CPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DiTConfig(_Frozen):
    """The causal, audio-driven Wan2.1 transformer."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256  # sinusoidal timestep embedding width (Wan2.1)
    text_dim: int  # width of the text encoder's embeddings (umT5-xxl: 4096)
    latent_channels: int = 16  # noisy latent channels (the Wan2.1 `in_dim`/`out_dim`)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # RoPE table length per axis (Wan2.1 uses 1024)

    # Conditioning (DESIGN 3.2). The reference latent and a mask are concatenated to the noisy latent;
    # they enter through their own zero-initialised patch embedding so Wan2.1 weights load unchanged.
    reference_channels: int = 16
    mask_channels: int = 1
    audio_injection: Literal["add", "cross_attn"] = "add"
    audio_feature_dim: int  # width of one audio feature vector (one per video frame)
    audio_window: int  # audio feature vectors per latent frame (covered frames + past context)
    audio_hidden: int  # width of the shared audio embedding fed to every layer

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Per-head dims rotated by (frame, height, width) positions: Wan2.1's 44/42/42 split at 128."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return (d - 2 * hw, hw, hw)

    @property
    def cond_channels(self) -> int:
        return self.reference_channels + self.mask_channels

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if any(d % 2 for d in self.rope_dims):
            raise ValueError(f"head_dim {self.head_dim} gives odd RoPE split {self.rope_dims}")
        return self


class VAEConfig(_Frozen):
    """Wan2.1's causal 3D VAE (diffusers AutoencoderKLWan) hyper-parameters."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    # Wan2.1's latent normalisation: z_norm = (z - mean) / std, per channel.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)


class AudioConfig(_Frozen):
    """How speech becomes one feature vector per video frame."""

    encoder: Literal["logmel", "wav2vec2"]
    sample_rate: int = 16000
    n_mels: int = 80  # logmel only
    context_frames: int = 4  # past video frames of audio each latent frame also sees (no look-ahead)


class TextConfig(_Frozen):
    encoder: Literal["none", "umt5"]
    max_length: int = 512  # umT5 tokens (Wan2.1 pads to 512)


class VideoConfig(_Frozen):
    height: int
    width: int
    fps: int = 25


class DeflickerConfig(_Frozen):
    """Motion-gated deflicker of the VAE's seams at latent-frame crossings (model/deflicker.py); frames = 0: off."""

    frames: int = Field(0, ge=0)  # video frames after each crossing that share its jump (< the VAE's temporal stride)
    # grey levels (0-255): a pixel changing this much is motion, left untouched. 32: `python -m
    # model.train.calibrate_deflicker` on the tiny model (docs/results.md); recalibrate for another VAE.
    threshold: float = Field(32.0, gt=0)


class GeneratorConfig(_Frozen):
    """Block-wise autoregressive sampling (DESIGN 3.3)."""

    frames_per_block: int = 3  # latent frames per block
    step_plan: tuple[int, ...] = (8, 6, 4)  # PSB: steps of block 0, 1, ..., the last repeats forever
    shift: float = 5.0  # flow-matching timestep shift
    num_train_timesteps: int = 1000
    t_mci: float = 100.0  # MCI: the timestep at which the previous block is re-written into the cache
    window_frames: int = 6  # latent frames kept in the cache besides the sink
    horizon_frames: int = 21  # RoPE temporal positions trained, sink included: positions < horizon
    reset_context_frames: int = 3  # URCR: latent frames re-written after a cache reset
    sink_frames: int = 1  # latent frames of the reference sink at the front of the cache
    # "euler": integrate the flow ODE (teachers, many steps); "renoise": predict x0 and re-noise with fresh noise at
    # the next level (the few-step distilled student, as in Self-Forcing).
    sampler: Literal["euler", "renoise"] = "euler"
    # Off by default: Wan2.1's decode stays exact. The tiny preset turns it on (its VAE's seams are visible).
    deflicker: DeflickerConfig = Field(default_factory=DeflickerConfig)

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if not self.step_plan or min(self.step_plan) < 1:
            raise ValueError(f"step_plan must be non-empty positive integers, got {self.step_plan}")
        if self.reset_context_frames > self.window_frames:
            raise ValueError("reset_context_frames cannot exceed window_frames")
        need = self.sink_frames + self.reset_context_frames + self.frames_per_block
        if self.horizon_frames < need:
            raise ValueError(f"horizon_frames {self.horizon_frames} < sink + reset context + block = {need}")
        return self


class Preset(_Frozen):
    """Everything needed to build and run one model."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    audio: AudioConfig
    text: TextConfig
    video: VideoConfig
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)

    @model_validator(mode="after")
    def _check(self) -> Preset:
        if self.generator.deflicker.frames >= self.vae.temporal_stride:
            raise ValueError(
                f"generator.deflicker.frames ({self.generator.deflicker.frames}) must be below the VAE's "
                f"temporal stride ({self.vae.temporal_stride})"
            )
        return self

    @property
    def latent_height(self) -> int:
        return self.video.height // self.vae.spatial_stride

    @property
    def latent_width(self) -> int:
        return self.video.width // self.vae.spatial_stride

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.dit.patch_size
        return (self.latent_height // ph) * (self.latent_width // pw)

    def with_resolution(self, height: int, width: int) -> Preset:
        stride = self.vae.spatial_stride * max(self.dit.patch_size[1:])
        if height % stride or width % stride:
            raise ValueError(f"resolution {height}x{width} must be a multiple of {stride}")
        return self.model_copy(update={"video": self.video.model_copy(update={"height": height, "width": width})})


def _tiny() -> Preset:
    audio = AudioConfig(encoder="logmel", n_mels=40, context_frames=4)
    vae = VAEConfig(
        base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1
    )  # decode of 12 frames ~0.15 s on 2 cores
    dit = DiTConfig(
        dim=192,
        ffn_dim=768,
        num_heads=3,
        num_layers=6,
        freq_dim=64,
        text_dim=32,
        patch_size=(1, 2, 2),
        audio_feature_dim=audio.n_mels,
        audio_window=vae.temporal_stride + audio.context_frames,
        audio_hidden=128,
    )
    return Preset(
        name="tiny",
        dit=dit,
        vae=vae,
        audio=audio,
        text=TextConfig(encoder="none", max_length=1),
        video=VideoConfig(height=64, width=64, fps=25),
        generator=GeneratorConfig(
            step_plan=(8, 6, 4),
            window_frames=6,
            horizon_frames=13,
            deflicker=DeflickerConfig(frames=vae.temporal_stride - 1),
        ),
    )


# wav2vec2-base: 768-d hidden states.
_WAV2VEC2_DIM = 768


def _wan21_1_3b() -> Preset:
    audio = AudioConfig(encoder="wav2vec2", context_frames=4)
    vae = VAEConfig(
        latents_mean=(
            -0.7571,
            -0.7089,
            -0.9113,
            0.1075,
            -0.1745,
            0.9653,
            -0.1517,
            1.5508,
            0.4134,
            -0.0715,
            0.5517,
            -0.3632,
            -0.1922,
            -0.9497,
            0.2503,
            -0.2921,
        ),
        latents_std=(
            2.8184,
            1.4541,
            2.3275,
            2.6558,
            1.2196,
            1.7708,
            2.6052,
            2.0743,
            3.2687,
            2.1526,
            2.8652,
            1.5579,
            1.6382,
            1.1253,
            2.8251,
            1.9160,
        ),
    )
    dit = DiTConfig(
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        num_layers=30,
        text_dim=4096,
        audio_feature_dim=_WAV2VEC2_DIM,
        audio_window=vae.temporal_stride + audio.context_frames,
        audio_hidden=512,
    )
    return Preset(
        name="wan2.1-1.3b",
        dit=dit,
        vae=vae,
        audio=audio,
        text=TextConfig(encoder="umt5", max_length=512),
        video=VideoConfig(height=480, width=832, fps=25),
        generator=GeneratorConfig(step_plan=(8, 6, 4), window_frames=6, horizon_frames=21),
    )


PRESETS = {"tiny": _tiny, "wan2.1-1.3b": _wan21_1_3b}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
