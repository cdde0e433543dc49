"""LiveTalk-1.3B (GAIR-NLP/LiveTalk) and OmniAvatar-1.3B in this project's terms.

LiveTalk's `CausalWanModel(**model_kwargs)` is Wan2.1 with OmniAvatar's audio conditioning; `preset_from_livetalk`
maps its constructor arguments and its inference settings onto a `Preset` of our one network, so a checkpoint of any
size in LiveTalk's layout (the real 1.3B, the reference fixtures' tiny one) loads into `CausalWanDiT` and renders
through the one engine. The shipped `livetalk-1.3b` preset (model/config.py) is this mapping of the real config.
"""

from __future__ import annotations

from model.config import (
    LIVETALK_PROMPT,
    AudioConfig,
    DiTConfig,
    Preset,
    TextConfig,
    VAEConfig,
    VideoConfig,
    get_preset,
    livetalk_generator,
)

# Constructor arguments of LiveTalk's / OmniAvatar's DiT that this mapping understands.
_KNOWN_KWARGS = {
    "dim", "in_dim", "ffn_dim", "out_dim", "text_dim", "freq_dim", "eps", "patch_size", "num_heads", "num_layers",
    "has_image_input", "use_audio", "audio_hidden_size", "local_attn_size", "sink_size", "model_type",
    "audio_feature_dim",  # ours, not LiveTalk's: its AudioPack reads OMNIAVATAR_AUDIO_FEATURE_DIM-wide features
}  # fmt: skip
OMNIAVATAR_AUDIO_FEATURE_DIM = 10752  # hard-wired in OmniAvatar's AudioPack (wav2vec2-base: 14 x 768)
ROPE_TABLE = 1024  # LiveTalk's precomputed RoPE table: positions 0 .. 1023 on every axis


def dit_config(model_kwargs: dict) -> DiTConfig:
    """Our DiTConfig for a LiveTalk/OmniAvatar `model_kwargs` (the 33 input channels: 16 noisy latent, 16 reference
    latent, 1 mask; audio projections before layers 2 .. num_layers // 2)."""
    unknown = set(model_kwargs) - _KNOWN_KWARGS
    if unknown:
        raise ValueError(f"unknown LiveTalk model arguments {sorted(unknown)}")
    if model_kwargs.get("has_image_input") or not model_kwargs.get("use_audio", True):
        raise ValueError("only the audio-driven, image-input-free LiveTalk/OmniAvatar DiT is supported")
    latent = model_kwargs["out_dim"]
    reference = latent
    if model_kwargs["in_dim"] != latent + reference + 1:
        raise ValueError(f"in_dim {model_kwargs['in_dim']} is not noisy | reference | mask = {2 * latent + 1}")
    layers = model_kwargs["num_layers"]
    return DiTConfig(
        dim=model_kwargs["dim"],
        ffn_dim=model_kwargs["ffn_dim"],
        num_heads=model_kwargs["num_heads"],
        num_layers=layers,
        freq_dim=model_kwargs["freq_dim"],
        text_dim=model_kwargs["text_dim"],
        latent_channels=latent,
        patch_size=tuple(model_kwargs["patch_size"]),
        eps=model_kwargs["eps"],
        rope_max_positions=ROPE_TABLE,
        reference_channels=reference,
        audio_encoder="pack",
        audio_layers=(2, layers // 2 + 1),
        audio_feature_dim=model_kwargs.get("audio_feature_dim", OMNIAVATAR_AUDIO_FEATURE_DIM),
        audio_window=4,  # AudioPack's patch: the 4 video frames of one latent frame
        audio_hidden=model_kwargs["audio_hidden_size"],
    )


def preset_from_livetalk(
    model_kwargs: dict,
    *,
    frames_per_block: int,
    height: int,
    width: int,
    fps: int = 16,
    vae: VAEConfig | None = None,
    text: TextConfig | None = None,
    shift: float = 5.0,
    steps: int = 4,
    name: str = "livetalk",
) -> Preset:
    """A Preset that renders as LiveTalk does with these constructor arguments and inference settings.
    `local_attn_size` -1 (an unbounded cache) becomes a cache as long as the RoPE table."""
    dit = dit_config(model_kwargs)
    shipped = get_preset("livetalk-1.3b")
    cache = model_kwargs.get("local_attn_size", -1)
    generator = livetalk_generator(
        frames_per_block=frames_per_block,
        cache_frames=ROPE_TABLE if cache == -1 else cache,
        sink_frames=model_kwargs.get("sink_size", 0),
        horizon_frames=ROPE_TABLE,
    ).model_copy(update={"shift": shift, "step_plan": (steps,)})
    return Preset(
        name=name,
        dit=dit,
        vae=vae or shipped.vae,
        audio=AudioConfig(encoder="omniavatar", context_frames=0, front_padding="first_frame"),
        text=text or TextConfig(encoder="umt5", max_length=512, default_prompt=LIVETALK_PROMPT),
        video=VideoConfig(height=height, width=width, fps=fps, portrait_fit="cover"),
        generator=type(generator).model_validate(generator.model_dump()),
    )
