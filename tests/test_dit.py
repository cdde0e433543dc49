"""The network: Wan2.1-exactness, streaming == block-causal, causality, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, diffusers_to_wan, load_wan_checkpoint, read_state_dict, wan_to_diffusers
from model.config import DiTConfig, get_preset
from model.dit import CausalWanDiT

SMALL = DiTConfig(
    dim=64,
    ffn_dim=128,
    num_heads=2,
    num_layers=2,
    freq_dim=32,
    text_dim=24,
    patch_size=(1, 2, 2),
    audio_feature_dim=10,
    audio_window=8,
    audio_hidden=16,
)


def randomize_conditioning(dit: CausalWanDiT, seed: int = 0) -> None:
    """Conditioning starts at zero; give it weights so tests exercise it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if dit.is_conditioning_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_inputs(cfg: DiTConfig, frames: int, h: int = 8, w: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, cfg.latent_channels, frames, h, w, generator=g)
    cond = torch.randn(1, cfg.cond_channels, frames, h, w, generator=g)
    audio = torch.randn(1, frames, cfg.audio_window, cfg.audio_feature_dim, generator=g)
    text = torch.randn(1, 5, cfg.text_dim, generator=g)
    timesteps = torch.rand(1, frames, generator=g) * 1000
    return latents, cond, audio, text, timesteps


def test_wan_preset_has_exact_backbone_parameter_count():
    with torch.device("meta"):
        dit = CausalWanDiT(get_preset("wan2.1-1.3b").dit)
    assert dit.backbone_parameters() == 1_418_996_800


def test_bidirectional_matches_diffusers_wan_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ours = CausalWanDiT(SMALL).eval()
    theirs = WanTransformer3DModel(
        patch_size=SMALL.patch_size,
        num_attention_heads=SMALL.num_heads,
        attention_head_dim=SMALL.head_dim,
        in_channels=SMALL.latent_channels,
        out_channels=SMALL.latent_channels,
        text_dim=SMALL.text_dim,
        freq_dim=SMALL.freq_dim,
        ffn_dim=SMALL.ffn_dim,
        num_layers=SMALL.num_layers,
        cross_attn_norm=SMALL.cross_attn_norm,
        eps=SMALL.eps,
    ).eval()
    backbone = {k: v for k, v in ours.state_dict().items() if not ours.is_conditioning_param(k)}
    missing, unexpected = theirs.load_state_dict(wan_to_diffusers(backbone), strict=True)
    assert not missing and not unexpected

    frames, h, w = 3, 8, 12
    latents, _, _, text, timesteps = make_inputs(SMALL, frames, h, w)
    tokens_per_frame = (h // 2) * (w // 2)
    with torch.no_grad():
        ref = theirs(latents, timesteps.repeat_interleave(tokens_per_frame, dim=1), text, return_dict=False)[0]
        out = ours(latents, timesteps, ours.embed_text(text), torch.arange(frames))
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-4, rel


def _stream(dit, cfg, latents, cond, audio, text, timesteps, sink, block, window, horizon):
    """Sink then blocks, each written into the cache by the same pass that computes its output."""
    tokens_per_frame = latents.shape[-1] * latents.shape[-2] // 4
    cache = dit.new_cache(
        tokens_per_frame=tokens_per_frame, sink_frames=sink, window_frames=window, horizon_frames=horizon
    )
    outs = []
    starts = [0, sink] + list(range(sink + block, latents.shape[2], block))
    for a, b in zip(starts, starts[1:] + [latents.shape[2]]):
        positions = cache.allocate(b - a)
        outs.append(
            dit(
                latents[:, :, a:b],
                timesteps[:, a:b],
                text,
                positions,
                cond[:, :, a:b],
                audio[:, a:b],
                attention="streaming",
                cache=cache,
                write_cache=True,
            )
        )
        cache.commit(b - a)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("injection", ["add", "cross_attn"])
def test_streaming_equals_block_causal(injection):
    cfg = SMALL.model_copy(update={"audio_injection": injection})
    torch.manual_seed(1)
    dit = CausalWanDiT(cfg).eval()
    randomize_conditioning(dit)
    sink, block, blocks = 1, 3, 4
    frames = sink + block * blocks
    latents, cond, audio, text, timesteps = make_inputs(cfg, frames)
    text = dit.embed_text(text)
    with torch.no_grad():
        full = dit(
            latents,
            timesteps,
            text,
            torch.arange(frames),
            cond,
            audio,
            attention="block_causal",
            frame_groups=[sink] + [block] * blocks,
        )
        streamed = _stream(
            dit, cfg, latents, cond, audio, text, timesteps, sink, block, window=block * blocks, horizon=frames
        )
    assert (full - streamed).abs().max() < 1e-5


def test_block_causal_is_causal():
    torch.manual_seed(2)
    dit = CausalWanDiT(SMALL).eval()
    randomize_conditioning(dit)
    groups = [1, 3, 3, 3]
    latents, cond, audio, text, timesteps = make_inputs(SMALL, sum(groups))
    text = dit.embed_text(text)
    changed = latents.clone()
    changed[:, :, 7:] += 1.0  # perturb the last block only
    audio_changed = audio.clone()
    audio_changed[:, 7:] -= 1.0
    with torch.no_grad():
        a = dit(latents, timesteps, text, torch.arange(10), cond, audio, attention="block_causal", frame_groups=groups)
        b = dit(
            changed,
            timesteps,
            text,
            torch.arange(10),
            cond,
            audio_changed,
            attention="block_causal",
            frame_groups=groups,
        )
    assert torch.equal(a[:, :, :7], b[:, :, :7])
    assert not torch.allclose(a[:, :, 7:], b[:, :, 7:])


def test_zero_conditioning_is_plain_wan():
    """A freshly built model (conditioning at zero) ignores reference and audio: it is exactly Wan2.1."""
    torch.manual_seed(3)
    dit = CausalWanDiT(SMALL).eval()
    latents, cond, audio, text, timesteps = make_inputs(SMALL, 4)
    text = dit.embed_text(text)
    with torch.no_grad():
        plain = dit(latents, timesteps, text, torch.arange(4))
        conditioned = dit(latents, timesteps, text, torch.arange(4), cond, audio)
    assert torch.equal(plain, conditioned)


def test_wan_and_diffusers_layouts_round_trip(tmp_path):
    dit = CausalWanDiT(SMALL)
    wan = {k: v for k, v in dit.state_dict().items() if not dit.is_conditioning_param(k)}
    diffusers = wan_to_diffusers(wan)
    assert "blocks.0.attn1.to_q.weight" in diffusers and "scale_shift_table" in diffusers
    assert "blocks.1.norm2.weight" in diffusers and "proj_out.weight" in diffusers
    back = diffusers_to_wan(diffusers)
    assert back.keys() == wan.keys() and all(torch.equal(back[k], wan[k]) for k in wan)

    # diffusers layout, sharded with an index, loads into a fresh model; conditioning is reported absent.
    keys = sorted(diffusers)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: diffusers[k].contiguous() for k in names}, tmp_path / name)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, names in shards.items() for k in names}})
    )
    fresh = CausalWanDiT(SMALL)
    report = load_wan_checkpoint(fresh, tmp_path)
    assert report.layout == "diffusers"
    assert report.absent_conditioning and all(fresh.is_conditioning_param(k) for k in report.absent_conditioning)
    assert "conditioning tensors absent" in str(report)
    assert all(torch.equal(fresh.state_dict()[k], wan[k]) for k in wan)

    # Wan original layout as a .pth read with weights_only=True.
    torch.save(wan, tmp_path / "wan.pth")
    assert read_state_dict(tmp_path / "wan.pth").keys() == wan.keys()
    assert load_wan_checkpoint(CausalWanDiT(SMALL), tmp_path / "wan.pth").layout == "wan"


def test_strict_load_names_every_offending_key(tmp_path):
    dit = CausalWanDiT(SMALL)
    state = {k: v for k, v in dit.state_dict().items() if not dit.is_conditioning_param(k)}
    del state["blocks.0.self_attn.q.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["head.head.bias"] = torch.zeros(5)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_wan_checkpoint(CausalWanDiT(SMALL), tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "blocks.0.self_attn.q.weight" in message
    assert "blocks.0.extra.weight" in message
    assert "head.head.bias" in message and "mis-shaped" in message


def test_bfloat16_forward_runs_and_stays_close_to_float32():
    torch.manual_seed(4)
    dit = CausalWanDiT(SMALL).eval()
    randomize_conditioning(dit)
    latents, cond, audio, text, timesteps = make_inputs(SMALL, 4)
    with torch.no_grad():
        ref = dit(latents, timesteps, dit.embed_text(text), torch.arange(4), cond, audio)
        half = dit.to(torch.bfloat16)
        out = half(
            latents.bfloat16(),
            timesteps,
            half.embed_text(text.bfloat16()),
            torch.arange(4),
            cond.bfloat16(),
            audio.bfloat16(),
        )
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 5e-2
