"""Audio features: per-video-frame timing, packing per latent frame, and no look-ahead past a block's end (plus the
preset's `lookahead_frames`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_parts import save_tiny_wav2vec2

from model.audio_features import (
    LogMelFeaturizer,
    Wav2Vec2Featurizer,
    build_featurizer,
    num_latent_frames,
    num_video_frames,
)
from model.config import AudioConfig, get_preset

SAMPLE_RATE, FPS, STRIDE = 16000, 25, 4
HOP = SAMPLE_RATE // FPS


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voiced = sum(np.sin(2 * np.pi * 130 * h * t) / h for h in range(1, 15)) * (np.sin(2 * np.pi * 2.5 * t) > 0)
    return (0.2 * voiced + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


def window_frame(latent: int, row: int, window: int) -> int:
    """The video frame whose feature sits at `row` of latent frame `latent`'s window (negative: before t=0)."""
    return latent * STRIDE - window + 1 + row


def test_frame_and_latent_counts():
    assert num_video_frames(0) == 1
    assert num_video_frames(1) == 1
    assert num_video_frames(HOP) == 1
    assert num_video_frames(HOP + 1) == 2
    assert num_video_frames(SAMPLE_RATE) == FPS
    assert num_video_frames(44100 * 2, sample_rate=44100, fps=30) == 60
    assert [num_latent_frames(n, STRIDE) for n in (1, 2, 5, 6, 9, 81)] == [1, 2, 2, 3, 3, 21]


def test_logmel_alignment_follows_latent_to_video_frame_mapping():
    """A burst inside video frame 9 only shows in the features of frames 9 and 10 (window = 2 hops)."""
    featurizer = LogMelFeaturizer(AudioConfig(encoder="logmel", n_mels=40, context_frames=4), FPS)
    window = featurizer.audio_window(STRIDE)
    assert window == STRIDE + 4
    samples = np.zeros(40 * HOP, np.float32)
    burst_frame = 9
    samples[burst_frame * HOP : (burst_frame + 1) * HOP] = speech_like(1.0)[:HOP]
    feats = featurizer.block_features(samples, 0, 10, STRIDE)
    assert feats.shape == (10, window, 40) and feats.dtype == torch.float32
    for latent in range(10):
        for row in range(window):
            frame = window_frame(latent, row, window)
            loud = feats[latent, row].abs().max().item() > 0.5
            assert loud == (frame in (burst_frame, burst_frame + 1)), (latent, row, frame)
    # Silence is exactly the zero vector the padding before t=0 uses.
    assert feats[0, : window - 1].abs().max() == 0 and feats[1:3].abs().max() == 0


def test_lookahead_shifts_each_window_later_by_that_many_frames():
    """With L frames of look-ahead a burst in video frame 9 reaches latent frames whose window ends up to L frames
    earlier, and the window keeps its context: s + context + L rows."""
    plain = LogMelFeaturizer(AudioConfig(encoder="logmel", n_mels=40, context_frames=4), FPS)
    ahead = LogMelFeaturizer(AudioConfig(encoder="logmel", n_mels=40, context_frames=4, lookahead_frames=3), FPS)
    assert ahead.audio_window(STRIDE) == plain.audio_window(STRIDE) + 3
    samples = speech_like(2.0)
    feats, shifted = plain.block_features(samples, 0, 8, STRIDE), ahead.block_features(samples, 0, 8, STRIDE)
    # Row r of latent k covers frame e_k + L - window + 1 + r: the same frames as the plain window, plus 3 later.
    torch.testing.assert_close(shifted[1:, : plain.audio_window(STRIDE)], feats[1:])
    # Its 3 extra rows, frames e_k + 1 .. e_k + 3, are frames e_(k+1) - 3 .. e_(k+1) - 1 of the next latent frame.
    torch.testing.assert_close(shifted[1:7, -3:], feats[2:8, -4:-1])
    _assert_no_lookahead(ahead, samples, [(0, 3), (3, 3), (6, 2)])


def test_a_stream_waits_for_the_lookahead_audio_before_a_block():
    from model.dit import CausalWanDiT
    from model.generator import AvatarModel
    from model.vae import WanVAE

    tiny = get_preset("tiny").with_resolution(32, 32)
    torch.manual_seed(0)
    model = AvatarModel(tiny, CausalWanDiT(tiny.dit), WanVAE(tiny.vae), description="random")
    session = model.open(np.zeros((32, 32, 3), np.uint8))
    first_block = 1 + tiny.vae.temporal_stride * (tiny.generator.frames_per_block - 1)  # video frames
    needed = (first_block + tiny.audio.lookahead_frames) * HOP
    session.feed_audio(speech_like(1.0)[: needed - 1])
    assert tiny.audio.lookahead_frames > 0 and not session.ready()
    session.feed_audio(speech_like(1.0)[needed - 1 : needed])
    assert session.ready()


def test_logmel_scale_is_fixed_and_roughly_unit():
    featurizer = LogMelFeaturizer(AudioConfig(encoder="logmel", n_mels=40), FPS)
    speech = speech_like(2.0)
    feats = featurizer.block_features(speech, 0, 13, STRIDE)[1:]
    assert 0.3 < feats.mean() < 2.5 and 0.1 < feats.std() < 1.5
    # Fixed constants: twice as loud shifts every non-silent feature by the same amount, not re-normalised.
    louder = featurizer.block_features(2 * speech, 0, 13, STRIDE)[1:]
    shift = (louder - feats)[feats > 0.5]
    assert torch.allclose(shift, torch.full_like(shift, 2 * np.log10(2) / 3.0), atol=1e-3)


def _assert_no_lookahead(featurizer, samples: np.ndarray, blocks: list[tuple[int, int]]) -> None:
    """Nothing past the end of a block's last video frame plus the featurizer's look-ahead is read."""
    rng = np.random.default_rng(1)
    for first, count in blocks:
        last_frame = window_frame(first + count - 1, 0, 1) + featurizer.lookahead_frames
        end = last_frame * HOP + HOP
        exact = featurizer.block_features(samples[:end], first, count, STRIDE)
        more = featurizer.block_features(samples, first, count, STRIDE)
        other_future = np.concatenate([samples[:end], rng.standard_normal(5 * HOP).astype(np.float32)])
        changed = featurizer.block_features(other_future, first, count, STRIDE)
        assert torch.equal(exact, more) and torch.equal(exact, changed), (first, count)
        # Audio ending early reads as silence: the same as zero-padding it by hand.
        short = samples[: end - 3 * HOP]
        padded = np.concatenate([short, np.zeros(3 * HOP, np.float32)])
        assert torch.equal(
            featurizer.block_features(short, first, count, STRIDE),
            featurizer.block_features(padded, first, count, STRIDE),
        )


def test_logmel_blocks_never_look_ahead_and_match_one_pass():
    featurizer = build_featurizer(get_preset("tiny"))
    assert featurizer.feature_dim == get_preset("tiny").dit.audio_feature_dim
    samples = speech_like(3.0)
    blocks = [(0, 3), (3, 3), (6, 1), (7, 3), (10, 3)]
    _assert_no_lookahead(featurizer, samples, blocks)
    whole = featurizer.block_features(samples, 0, 13, STRIDE)
    by_block = torch.cat([featurizer.block_features(samples, f, n, STRIDE) for f, n in blocks])
    torch.testing.assert_close(by_block, whole, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_wav2vec2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav2vec2")
    save_tiny_wav2vec2(path)
    return str(path)


def test_wav2vec2_features_aligned_to_latent_frames_without_lookahead(tiny_wav2vec2_dir):
    audio = AudioConfig(encoder="wav2vec2", context_frames=4)
    featurizer = Wav2Vec2Featurizer(tiny_wav2vec2_dir, audio, FPS, history_frames=10)
    assert featurizer.feature_dim == 32
    samples = speech_like(2.0)
    feats = featurizer.block_features(samples, 0, 3, STRIDE)
    window = STRIDE + audio.context_frames
    assert feats.shape == (3, window, 32) and feats.dtype == torch.float32
    for latent in range(3):  # zero exactly for the frames before t=0
        for row in range(window):
            before_start = window_frame(latent, row, window) < 0
            assert (feats[latent, row].abs().sum() == 0) == before_start, (latent, row)
    # Latent 1's window ends at video frame 4, latent 2's at 8: they overlap by window - STRIDE frames.
    torch.testing.assert_close(feats[2, : window - STRIDE], feats[1, STRIDE:])
    _assert_no_lookahead(featurizer, samples, [(0, 3), (3, 3), (6, 2)])
    assert featurizer.block_features(samples, 3, 3, STRIDE).shape == (3, window, 32)


def test_build_featurizer_checks_preset():
    with pytest.raises(ValueError, match="wav2vec2"):
        build_featurizer(get_preset("wan2.1-1.3b"))
