"""Wan2.1 causal VAE: shapes, latent normalisation, save/load, and block-wise streaming decode == full decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import VAEConfig
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
