"""Typed configuration of the network, the VAE, the encoders and the generator.

Every shape in `model/` is derived from these objects; presets are plain functions returning them.
`wan2.1-1.3b` is Wan2.1-T2V-1.3B exactly (plus zero-initialised conditioning); `tiny` is the same
code at a size that trains and renders on a 2-core CPU.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    # The shared audio encoder of each latent frame's window: "mlp" (Linear, SiLU, Linear: this project's models) or
    # "pack" (OmniAvatar's AudioPack: one Linear over the window, then LayerNorm).
    audio_encoder: Literal["mlp", "pack"] = "mlp"
    # Layers [first, last) that receive the audio (one projection each); None: every layer.
    audio_layers: tuple[int, int] | None = None
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

    @property
    def audio_layer_range(self) -> range:
        first, last = self.audio_layers or (0, self.num_layers)
        return range(first, last)

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if any(d % 2 for d in self.rope_dims):
            raise ValueError(f"head_dim {self.head_dim} gives odd RoPE split {self.rope_dims}")
        if self.audio_layers is not None and not 0 <= self.audio_layers[0] < self.audio_layers[1] <= self.num_layers:
            raise ValueError(f"audio_layers {self.audio_layers} must be a range inside [0, {self.num_layers}]")
        if self.audio_encoder == "pack" and self.audio_injection != "add":
            raise ValueError("the AudioPack encoder feeds per-layer projections (audio_injection='add')")
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

    # "logmel": log-mel energies (the tiny preset). "wav2vec2": wav2vec2's last hidden state, interpolated to the
    # video frame rate, from a bounded window of past audio (streaming). "omniavatar": OmniAvatar's wav2vec2 path
    # (conv features interpolated to the frame rate before the encoder; the last hidden state and every hidden state
    # concatenated), encoded over the whole clip as OmniAvatar and LiveTalk do, in windows for very long audio.
    encoder: Literal["logmel", "wav2vec2", "omniavatar"]
    sample_rate: int = 16000
    n_mels: int = 80  # logmel only
    context_frames: int = 4  # past video frames of audio each latent frame also sees
    # Future video frames of audio each latent frame also sees: lips move before the sound they make (SynthTalk's
    # coarticulation, like real speech, opens the mouth ~100 ms ahead), and a streaming render waits this long for
    # its audio.
    lookahead_frames: int = Field(0, ge=0)
    # What stands for the video frames before the start of the audio in a latent frame's window: zero vectors, or
    # copies of the first frame's features (OmniAvatar pads the front of the clip with three of them).
    front_padding: Literal["zeros", "first_frame"] = "zeros"
    # omniavatar: audio up to this long is encoded in one pass over the whole clip (exactly as the reference does);
    # longer audio in windows of this length, each with `window_context_seconds` of overlap on both sides.
    window_seconds: float = Field(256.0, gt=0)
    window_context_seconds: float = Field(8.0, ge=0)


class TextConfig(_Frozen):
    encoder: Literal["none", "umt5"]
    max_length: int = 512  # umT5 tokens (Wan2.1 pads to 512)
    default_prompt: str = ""  # the prompt of a row that gives none


class VideoConfig(_Frozen):
    height: int
    width: int
    fps: int = 25
    # How a portrait of another shape becomes height x width: "crop" (centre-crop to the aspect, then Lanczos) or
    # "cover" (OmniAvatar/LiveTalk: bilinear resize until it covers the frame, then centre-crop the overflow).
    portrait_fit: Literal["crop", "cover"] = "crop"


class DeflickerConfig(_Frozen):
    """Motion-gated deflicker of the VAE's seams at latent-frame crossings (model/deflicker.py); frames = 0: off."""

    frames: int = Field(0, ge=0)  # video frames after each crossing that share its jump (< the VAE's temporal stride)
    # grey levels (0-255): a pixel changing this much is motion, left untouched. 32: `python -m
    # model.train.calibrate_deflicker` on the tiny model (docs/results.md); recalibrate for another VAE.
    threshold: float = Field(32.0, gt=0)


class PasteBackConfig(_Frozen):
    """Motion-gated paste-back of the portrait's detail into decoded frames (model/paste_back.py); threshold 0: off."""

    # grey levels (0-255): a pixel this far from the decoded portrait has moved and keeps the generator's value, nearer
    # ones get the portrait's detail in proportion. 128: `python -m model.train.calibrate_paste_back` on the tiny
    # model's validation clips, against their steady truth (docs/results.md).
    threshold: float = Field(0.0, ge=0)


class GeneratorConfig(_Frozen):
    """Block-wise autoregressive sampling (DESIGN 3.3)."""

    frames_per_block: int = 3  # latent frames per block
    step_plan: tuple[int, ...] = (8, 6, 4)  # PSB: steps of block 0, 1, ..., the last repeats forever
    shift: float = 5.0  # flow-matching timestep shift
    num_train_timesteps: int = 1000
    t_mci: float = 100.0  # MCI: the timestep at which the previous block is re-written into the cache
    window_frames: int = 6  # latent frames kept in the cache besides the sink (the block itself comes on top)
    horizon_frames: int = 21  # RoPE temporal positions trained, sink included: positions < horizon
    reset_context_frames: int = 3  # URCR: latent frames re-written after a cache reset
    sink_frames: int = 1  # latent frames at the front of the cache that are never evicted
    # What the sink holds: "reference", the portrait's latent written once before block 0 at position 0 (this
    # project's models); "first_frames", the first `sink_frames` generated latent frames (LiveTalk: the portrait
    # reaches the model only through the conditioning channels).
    sink: Literal["reference", "first_frames"] = "reference"
    # Block 0's latent frame 0 is the portrait's latent, set before every denoising step and in the output (LiveTalk).
    pin_first_frame: bool = False
    # The conditioning mask channel: "reference_entry", 1 on the reference sink entry and 0 on generated frames;
    # "generated_frames", 0 at latent frame 0 (the portrait's frame) and 1 at every later one (OmniAvatar, LiveTalk).
    mask: Literal["reference_entry", "generated_frames"] = "reference_entry"
    # "euler": integrate the flow ODE (teachers, many steps); "renoise": predict x0 and re-noise with fresh noise at
    # the next level (the few-step distilled student, as in Self-Forcing).
    sampler: Literal["euler", "renoise"] = "euler"
    # Off by default: Wan2.1's decode stays exact. For a VAE that packs frames and whose seams show (the 64x64 tiny
    # model's stride-4 VAE had them; today's tiny VAE has stride 1 and no crossings inside a latent frame).
    deflicker: DeflickerConfig = Field(default_factory=DeflickerConfig)
    # Off by default (Wan2.1 and LiveTalk render as their own code does); the tiny preset turns it on.
    paste_back: PasteBackConfig = Field(default_factory=PasteBackConfig)

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if not self.step_plan or min(self.step_plan) < 1:
            raise ValueError(f"step_plan must be non-empty positive integers, got {self.step_plan}")
        if self.reset_context_frames > self.window_frames:
            raise ValueError("reset_context_frames cannot exceed window_frames")
        if self.sink == "reference" and self.sink_frames != 1:
            raise ValueError("the reference sink is one latent frame (one portrait)")
        if self.mask == "reference_entry" and self.sink != "reference":
            raise ValueError("mask 'reference_entry' marks the reference sink entry: it needs sink='reference'")
        need = self.sink_frames + self.reset_context_frames + self.frames_per_block
        if self.horizon_frames < need:
            raise ValueError(f"horizon_frames {self.horizon_frames} < sink + reset context + block = {need}")
        return self


def parse_step_plan(value: str | int | Sequence[int | str]) -> tuple[int, ...]:
    """The one reader of a PSB step plan as people write it: "8,6,4", [8, 6, 4] or 4 (a CSV's "4.0" too)."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        plan = tuple(_step_count(item) for item in items)
    except (TypeError, ValueError, OverflowError):
        plan = ()
    if not plan or min(plan) < 1:
        raise ValueError(f"bad step plan {value!r}: want positive integers such as 8,6,4")
    return plan


def _step_count(item: object) -> int:
    number = float(item.strip()) if isinstance(item, str) else item
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or number != int(number):
        raise ValueError(f"not a whole number: {item!r}")
    return int(number)


class RenderSettings(BaseModel):
    """Per-render overrides of the preset's generator settings (a manifest row's `render` options validate into it)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    step_plan: tuple[int, ...] | None = None  # PSB; "8,6,4", [8, 6, 4] and 4 are read by parse_step_plan
    t_mci: float | None = None
    height: int | None = None
    width: int | None = None
    # Ablation only: False lets temporal positions grow past the trained horizon, up to the end of the RoPE table
    # (`rope_max_positions`), where a reset is still forced because no later position exists.
    urcr: bool = True
    # Measurement only: False gives the decoder's frames without the preset's deflicker (generator.deflicker).
    deflicker: bool = True
    # Measurement only: False gives the decoder's frames without the preset's paste-back (generator.paste_back).
    paste_back: bool = True

    @field_validator("step_plan", mode="before")
    @classmethod
    def _parse_step_plan(cls, value):
        return None if value is None else parse_step_plan(value)


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

    def with_generator(self, **update) -> Preset:
        """This preset with some of its generator's fields replaced (a calibrated threshold, an ablation), validated
        as a new GeneratorConfig: an unknown field or a bad value raises instead of riding along unchecked."""
        generator = type(self.generator).model_validate({**dict(self.generator), **update})
        return self.model_copy(update={"generator": generator})


def _tiny() -> Preset:
    # 2 frames ahead (80 ms, 1.6 std of SynthTalk's coarticulation): with a latent per video frame no frame sees any
    # later audio otherwise (stride 4 gave its frames 0-3 frames, 1.5 on average).
    audio = AudioConfig(encoder="logmel", n_mels=40, context_frames=4, lookahead_frames=2)
    # base_dim 16 at 128x128: 2.6M parameters. No temporal compression (a latent frame per video frame): a VAE this
    # small lost more than the still portrait's whole margin packing 4 frames into one latent (validation clips: 22.4 dB
    # against the still's 22.5), where the same weights one frame at a time give 25.6 dB; the DiT's share of a
    # render is small enough at this size that 4x the latent frames cost no measurable speed.
    vae = VAEConfig(base_dim=16, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, temperal_downsample=(False,) * 3)
    dit = DiTConfig(
        dim=192,
        ffn_dim=768,
        num_heads=3,
        num_layers=6,
        freq_dim=64,
        text_dim=32,
        patch_size=(1, 2, 2),
        audio_feature_dim=audio.n_mels,
        audio_window=vae.temporal_stride + audio.context_frames + audio.lookahead_frames,
        audio_hidden=128,
    )
    return Preset(
        name="tiny",
        dit=dit,
        vae=vae,
        audio=audio,
        text=TextConfig(encoder="none", max_length=1),
        video=VideoConfig(height=128, width=128, fps=25),
        generator=GeneratorConfig(
            step_plan=(8, 6, 4),
            window_frames=6,
            horizon_frames=13,
            pin_first_frame=True,  # frame 0 is the portrait's latent: the render starts as the portrait
            deflicker=DeflickerConfig(frames=vae.temporal_stride - 1),  # 0 (off): no seams inside latent frames
            paste_back=PasteBackConfig(threshold=128.0),  # the portrait's own pixels wherever the frame still shows it
        ),
    )


# wav2vec2-base: 768-d hidden states.
_WAV2VEC2_DIM = 768


# Wan2.1's VAE latent statistics (z_norm = (z - mean) / std, per channel).
# fmt: off
_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# fmt: on


def _wan21_vae() -> VAEConfig:
    return VAEConfig(latents_mean=_WAN21_LATENTS_MEAN, latents_std=_WAN21_LATENTS_STD)


def _wan21_backbone(**conditioning) -> DiTConfig:
    """Wan2.1-T2V-1.3B's transformer with the given conditioning fields."""
    return DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, **conditioning)


def _wan21_1_3b() -> Preset:
    audio = AudioConfig(encoder="wav2vec2", context_frames=4)
    vae = _wan21_vae()
    dit = _wan21_backbone(
        audio_feature_dim=_WAV2VEC2_DIM,
        audio_window=vae.temporal_stride + audio.context_frames + audio.lookahead_frames,
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


# LiveTalk-1.3B-V0.1 (Wan2.1-T2V-1.3B + OmniAvatar's audio conditioning, a 4-step block-causal student).
LIVETALK_PROMPT = (  # the prompt of LiveTalk's inference config, for rows that give none
    "A realistic video of a person speaking directly to the camera. The individual maintains steady eye contact with "
    "clear, expressive facial features. Their facial expressions are naturally animated and emotionally engaging, "
    "with precise lip movements perfectly synchronized to their speech."
)
_OMNIAVATAR_AUDIO_DIM = _WAV2VEC2_DIM * 14  # the last hidden state, then all 13 hidden states of wav2vec2-base
_LIVETALK_CACHE_FRAMES = 15  # latent frames the KV cache holds, the block being generated included
_LIVETALK_SINK_FRAMES = 9  # of them, the first frames of the video, never evicted


def livetalk_generator(*, frames_per_block: int, cache_frames: int, sink_frames: int, horizon_frames: int):
    """LiveTalk's sampling and cache policy: 4 re-noised steps, clean (t = 0) context writes, the first frame pinned
    to the portrait, a cache of `cache_frames` latent frames (the block included) whose first `sink_frames` stay."""
    return GeneratorConfig(
        frames_per_block=frames_per_block,
        step_plan=(4,),
        sampler="renoise",
        shift=5.0,
        t_mci=0.0,
        sink="first_frames",
        sink_frames=sink_frames,
        window_frames=cache_frames - sink_frames - frames_per_block,
        reset_context_frames=min(frames_per_block, cache_frames - sink_frames - frames_per_block),
        horizon_frames=horizon_frames,
        pin_first_frame=True,
        mask="generated_frames",
    )


def _livetalk_1_3b() -> Preset:
    vae = _wan21_vae()
    dit = _wan21_backbone(
        audio_encoder="pack",
        audio_layers=(2, 30 // 2 + 1),  # one projection before each of layers 2 .. num_layers // 2
        audio_feature_dim=_OMNIAVATAR_AUDIO_DIM,
        audio_window=vae.temporal_stride,  # the 4 video frames a latent frame covers, no extra context
        audio_hidden=32,
    )
    return Preset(
        name="livetalk-1.3b",
        dit=dit,
        vae=vae,
        audio=AudioConfig(encoder="omniavatar", context_frames=0, front_padding="first_frame"),
        text=TextConfig(encoder="umt5", max_length=512, default_prompt=LIVETALK_PROMPT),
        video=VideoConfig(height=512, width=512, fps=16, portrait_fit="cover"),
        generator=livetalk_generator(
            frames_per_block=3,
            cache_frames=_LIVETALK_CACHE_FRAMES,
            sink_frames=_LIVETALK_SINK_FRAMES,
            horizon_frames=dit.rope_max_positions,  # URCR takes over where LiveTalk's RoPE table ends
        ),
    )


PRESETS = {"tiny": _tiny, "wan2.1-1.3b": _wan21_1_3b, "livetalk-1.3b": _livetalk_1_3b}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
