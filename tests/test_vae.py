"""Wan2.1 causal VAE: shapes, latent normalisation, save/load, and block-wise streaming decode == full decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import DeflickerConfig, VAEConfig, get_preset
from model.deflicker import deflicker_video
from model.vae import StreamingDecoder, WanVAE, frames_to_tensor, tensor_to_frames

Z_DIM = 16


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    generator = torch.Generator().manual_seed(0)
    config = VAEConfig(
        base_dim=16,
        z_dim=Z_DIM,
        dim_mult=(1, 2, 4, 4),
        num_res_blocks=1,
        latents_mean=tuple(torch.randn(Z_DIM, generator=generator).tolist()),
        latents_std=tuple((0.5 + torch.rand(Z_DIM, generator=generator)).tolist()),
    )
    torch.manual_seed(0)
    return WanVAE(config).eval()


def test_streaming_decode_equals_full_decode(vae):
    latents = torch.randn(1, Z_DIM, 7, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = vae.decode(latents)
    assert full.shape == (1, 3, 1 + 4 * 6, 32, 32)
    stream = StreamingDecoder(vae)
    blocks = [stream.decode_block(latents[:, :, a:b]) for a, b in [(0, 3), (3, 4), (4, 6), (6, 7)]]
    assert [b.shape[2] for b in blocks] == [1 + 4 * 2, 4, 8, 4]  # first latent frame: 1 video frame
    streamed = torch.cat(blocks, dim=2)
    assert ((streamed - full).norm() / full.norm()).item() < 1e-4

    stream.reset()  # a new stream starts from frame 0 again
    again = stream.decode_block(latents[:, :, :3])
    assert again.shape[2] == 9
    torch.testing.assert_close(again, full[:, :, :9], rtol=1e-4, atol=1e-5)


def test_streaming_deflicker_equals_the_whole_video_deflicker(vae):
    latents = torch.randn(1, Z_DIM, 7, 4, 4, generator=torch.Generator().manual_seed(1))
    # A threshold no change reaches: every crossing is blended, so the stream's carried frame matters everywhere.
    cfg = DeflickerConfig(frames=3, threshold=1000.0)
    with torch.no_grad():
        raw = vae.decode(latents).clamp(-1, 1)
    whole = deflicker_video(raw, vae.temporal_stride, cfg)
    stream = StreamingDecoder(vae, cfg)
    streamed = torch.cat([stream.decode_block(latents[:, :, a:b]) for a, b in [(0, 3), (3, 4), (4, 6), (6, 7)]], dim=2)
    torch.testing.assert_close(streamed, whole, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole, raw, atol=1e-3)  # it did blend
    # Untouched: frame 0 and the last frame of every latent frame's 4 (where the fade has ended).
    torch.testing.assert_close(whole[:, :, ::4], raw[:, :, ::4])


def test_deflicker_spreads_small_seams_and_leaves_motion_alone():
    """A still face whose VAE error shifts by 2 grey levels at every latent-frame crossing, and a mouth that opens
    (100 grey levels) at one crossing."""
    stride, frames = 4, 1 + 4 * 4
    video = torch.zeros(1, 3, frames, 8, 8)
    for k, start in enumerate(range(1, frames, stride)):
        video[:, :, start : start + stride] += (2.0 if k % 2 == 0 else 0.0) / 127.5  # the seam alternates
    video[:, :, 5:, :2, :2] += 100 / 127.5  # the mouth opens at the crossing into frame 5
    out = deflicker_video(video, stride, DeflickerConfig(frames=stride - 1, threshold=24.0))
    change = (out.diff(dim=2) * 127.5).abs()  # (1, 3, frames - 1, 8, 8) grey levels
    face, mouth = change[..., 4:, 4:], change[..., :2, :2]
    crossings = [s - 1 for s in range(1, frames, stride)]  # pair i joins frames i and i + 1
    # The 2-level jump, gated by g = 1 - 2/24, is added back with weights 3/4, 1/2, 1/4: 4 steps, not one jump.
    g = 1 - 2.0 / 24.0
    expected_crossing, expected_inside = 2.0 * (1 - 0.75 * g), 2.0 * 0.25 * g
    inside = [i for i in range(frames - 1) if i not in crossings]
    torch.testing.assert_close(face[:, :, crossings], torch.full_like(face[:, :, crossings], expected_crossing))
    torch.testing.assert_close(face[:, :, inside], torch.full_like(face[:, :, inside], expected_inside))
    torch.testing.assert_close(out[:, :, ::stride], video[:, :, ::stride])  # the frame before a crossing: as decoded
    # The mouth's change stays whole, at its frame (100 less the seam's 2): motion is not smeared over time.
    assert mouth[:, :, 4].amin() > 97.0 and mouth[:, :, 5:].amax() <= expected_crossing + 1e-3
    # Off: the decoder's frames as they are.
    assert torch.equal(deflicker_video(video, stride, DeflickerConfig()), video)


def test_preset_rejects_a_deflicker_fade_longer_than_a_latent_frame():
    tiny = get_preset("tiny")
    assert tiny.generator.deflicker.frames == tiny.vae.temporal_stride - 1  # the bundled model's setting
    gen = tiny.generator.model_copy(update={"deflicker": DeflickerConfig(frames=tiny.vae.temporal_stride)})
    with pytest.raises(ValueError, match="below the VAE's temporal stride"):
        type(tiny).model_validate({**tiny.model_dump(), "generator": gen.model_dump()})


def test_encode_normalises_the_posterior_mean_and_decode_inverts_it(vae):
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video)
        raw = vae.model.encode(video).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        assert latents.shape == (1, Z_DIM, 3, 4, 4)
        torch.testing.assert_close(latents, (raw - mean) / std)
        torch.testing.assert_close(vae.decode(latents), vae.model.decode(raw).sample)
        image = vae.encode(video[:, :, :1])  # a single image (the portrait) is one latent frame
        assert image.shape == (1, Z_DIM, 1, 4, 4)
        torch.testing.assert_close(image, latents[:, :, :1], rtol=1e-4, atol=1e-5)  # causal: frame 0 alone
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(video[:, :, :6])


def test_identity_normalisation_without_latent_stats():
    config = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,))
    vae = WanVAE(config).eval()
    assert (config.spatial_stride, config.temporal_stride) == (2, 2)
    video = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(video), vae.model.encode(video).latent_dist.mean)


def test_save_load_and_diffusers_directory_round_trip(vae, tmp_path):
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(video)
        vae.save(tmp_path / "ours")
        loaded = WanVAE.load(tmp_path / "ours").eval()
        assert loaded.config == vae.config
        assert torch.equal(loaded.encode(video), expected)
        vae.model.save_pretrained(tmp_path / "diffusers")
        pretrained = WanVAE.from_pretrained(tmp_path / "diffusers").eval()
        assert pretrained.config == vae.config
        assert torch.equal(pretrained.encode(video), expected)


def test_frame_tensor_conversions_round_trip():
    frames = (np.random.default_rng(0).random((5, 16, 24, 3)) * 255).astype(np.uint8)
    video = frames_to_tensor(frames)
    assert video.shape == (1, 3, 5, 16, 24) and video.min() >= -1 and video.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames(video), frames)
    np.testing.assert_array_equal(tensor_to_frames(video[0]), frames)


def test_the_fast_forwards_compute_what_diffusers_does():
    """WanVAE runs diffusers' causal convs as per-frame 2D convs where that is exact and its RMS norms with an rsqrt:
    encode and decode agree with the plain diffusers modules, for full temporal taps and for frame-local ones."""
    from diffusers import AutoencoderKLWan

    from model.config import VAEConfig
    from model.train.vae import zero_temporal_taps
    from model.vae import _diffusers_kwargs

    config = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
    torch.manual_seed(0)
    ours = WanVAE(config).eval()
    plain = AutoencoderKLWan(**_diffusers_kwargs(config)).eval()
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for frame_local in (False, True):
        if frame_local:
            zero_temporal_taps(ours)
        plain.load_state_dict(ours.model.state_dict())
        with torch.no_grad():
            z, z_plain = ours.model.encode(video).latent_dist.mean, plain.encode(video).latent_dist.mean
            out, out_plain = ours.model.decode(z).sample, plain.decode(z).sample
        assert torch.allclose(z, z_plain, atol=1e-5) and torch.allclose(out, out_plain, atol=1e-5)
