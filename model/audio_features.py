"""Speech -> one feature vector per video frame, packed per latent frame (DESIGN 3.2).

Timing. Video frame i spans [i/fps, (i+1)/fps); its feature may use audio only up to the frame's end.
The VAE's temporal stride s maps latent frame 0 to video frame 0 and latent frame k >= 1 to video frames
s*k-s+1 .. s*k. Latent frame k is conditioned on a window of `audio_window = s + context_frames` feature
vectors: the video frames ending at its last covered frame (e_k = s*k, or 0 for k = 0), i.e. frames
e_k - audio_window + 1 .. e_k; frames before the start of the audio (negative indices) are zero vectors.
A generation block's features are computed from the samples before the block's end only, so they are
the same whether the rest of the speech is known yet or not (no look-ahead; streaming-safe).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod

import numpy as np
import torch

from model.config import AudioConfig, Preset


def num_video_frames(num_samples: int, sample_rate: int = 16000, fps: int = 25) -> int:
    """Video frames needed to show `num_samples` of audio: ceil(duration * fps), at least 1."""
    return max(1, -(-int(num_samples) * fps // sample_rate))


def num_latent_frames(num_video_frames: int, temporal_stride: int) -> int:
    """Latent frames covering `num_video_frames`: 1 + ceil((n - 1) / s)."""
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    return 1 + -(-(num_video_frames - 1) // temporal_stride)


def last_video_frame(latent_index: int, temporal_stride: int) -> int:
    """Index of the last video frame covered by a latent frame (0 for latent 0, s*k otherwise)."""
    return latent_index * temporal_stride


class AudioFeaturizer(ABC):
    """Per-video-frame speech features, packed per latent frame for one generation block at a time."""

    feature_dim: int

    def __init__(self, audio: AudioConfig, fps: int):
        if audio.sample_rate % fps:
            raise ValueError(f"sample_rate {audio.sample_rate} must be a multiple of fps {fps}")
        self.audio = audio
        self.fps = fps
        self.sample_rate = audio.sample_rate
        self.hop = audio.sample_rate // fps  # samples per video frame (640 at 16 kHz / 25 fps)
        self.context_frames = audio.context_frames

    def audio_window(self, temporal_stride: int) -> int:
        return temporal_stride + self.context_frames

    @abstractmethod
    def frame_features(self, samples: np.ndarray, first_frame: int, last_frame: int, offset: int) -> torch.Tensor:
        """Features (last_frame - first_frame + 1, feature_dim) of video frames first..last (first >= 0).

        `samples[0]` is stream sample `offset` (at most `(first_frame - history_frames) * hop`, or 0), and
        `samples` ends exactly at the end of `last_frame` ((last_frame + 1) * hop).
        """

    history_frames: int  # video frames before `first_frame` whose audio frame_features reads

    def first_sample_needed(self, first_latent: int, temporal_stride: int) -> int:
        """The earliest sample a block starting at `first_latent` reads (earlier audio may be dropped)."""
        first_frame = last_video_frame(first_latent, temporal_stride) - self.audio_window(temporal_stride) + 1
        return max(0, (max(first_frame, 0) - self.history_frames) * self.hop)

    def block_features(
        self, samples: np.ndarray, first_latent: int, num_latent: int, temporal_stride: int, offset: int = 0
    ) -> torch.Tensor:
        """(num_latent, audio_window, feature_dim) float32 for latent frames first_latent .. +num_latent-1.

        `samples`: mono audio at `sample_rate` whose first sample is sample `offset` of the stream (0: from time 0;
        a streaming caller may drop what `first_sample_needed` says no block reads any more). Only samples before
        the block's end are read, and missing ones (audio shorter than the video) count as silence. The cost does
        not depend on the block's position in the stream.
        """
        if num_latent < 1 or first_latent < 0:
            raise ValueError(f"need first_latent >= 0 and num_latent >= 1, got {first_latent}, {num_latent}")
        window = self.audio_window(temporal_stride)
        ends = [last_video_frame(k, temporal_stride) for k in range(first_latent, first_latent + num_latent)]
        first_frame, last_frame = ends[0] - window + 1, ends[-1]
        start_sample = self.first_sample_needed(first_latent, temporal_stride)
        if offset > start_sample:
            raise ValueError(f"the block needs audio from sample {start_sample}, but samples start at {offset}")
        end_sample = (last_frame + 1) * self.hop
        block_samples = np.zeros(end_sample - start_sample, dtype=np.float32)
        available = np.asarray(samples[start_sample - offset : end_sample - offset], dtype=np.float32)
        block_samples[: len(available)] = available

        computed_from = max(first_frame, 0)
        feats = self.frame_features(block_samples, computed_from, last_frame, start_sample).float()
        # Zero vectors stand for the frames before the start of the audio.
        feats = torch.cat([feats.new_zeros(computed_from - first_frame, self.feature_dim), feats])
        rows = torch.tensor([end - first_frame for end in ends])[:, None] - window + 1 + torch.arange(window)
        return feats[rows].contiguous()


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale, each of peak 1."""
    f_max = sample_rate / 2 if f_max is None else f_max

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    filters = np.clip(np.minimum(rising, falling), 0.0, None)
    if (filters.sum(axis=1) == 0).any():
        raise ValueError(f"{n_mels} mel bands are too many for an FFT of {n_fft} at {sample_rate} Hz")
    return torch.from_numpy(filters.astype(np.float32))


class LogMelFeaturizer(AudioFeaturizer):
    """Log-mel energies: one n_mels vector per video frame from the 2 hops of audio ending at the frame's end."""

    WINDOW_HOPS = 2  # analysis window: the frame itself and the one before it
    # Fixed normalisation (not per-clip statistics, which would let future audio change a block's features):
    # (log10(power) - log10(floor)) / scale maps silence to 0, like the zero vectors before the audio starts,
    # and speech at ordinary levels (power 1e-6 .. 1e-2 of full scale) to roughly 0.7 .. 2.
    POWER_FLOOR = 1e-8
    LOG_POWER_SCALE = 3.0

    def __init__(self, audio: AudioConfig, fps: int = 25):
        super().__init__(audio, fps)
        self.feature_dim = audio.n_mels
        self.history_frames = self.WINDOW_HOPS - 1
        self.win_length = self.WINDOW_HOPS * self.hop
        self.window = torch.hann_window(self.win_length, periodic=True)
        # Scale so a full-scale sine's peak bin has power ~1/4 whatever the window length.
        self.power_scale = 1.0 / float(self.window.sum()) ** 2
        self.mel = mel_filterbank(audio.n_mels, self.win_length, audio.sample_rate)

    def frame_features(self, samples: np.ndarray, first_frame: int, last_frame: int, offset: int) -> torch.Tensor:
        start = (first_frame + 1) * self.hop - self.win_length  # the first frame's window start
        x = torch.from_numpy(samples[max(start, 0) - offset :])
        x = torch.nn.functional.pad(x, (max(-start, 0), 0))  # zeros before time 0
        spec = torch.stft(
            x, n_fft=self.win_length, hop_length=self.hop, window=self.window, center=False, return_complex=True
        )  # (freq, frames): frame j is the window ending at the end of video frame first_frame + j
        power = spec.abs().square() * self.power_scale
        mel = self.mel @ power
        log_mel = torch.log10(mel.clamp_min(self.POWER_FLOOR) / self.POWER_FLOOR)
        feats = (log_mel / self.LOG_POWER_SCALE).T
        assert feats.shape[0] == last_frame - first_frame + 1
        return feats


class Wav2Vec2Featurizer(AudioFeaturizer):
    """wav2vec2 last hidden states (transformers, local directory only), interpolated to the video frame rate.

    A block is encoded from a bounded window of past audio ending at the block's end: `history_frames`
    video frames of context plus the frames the block needs. Cost per block is therefore constant.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        audio: AudioConfig,
        fps: int = 25,
        history_frames: int = 50,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import Wav2Vec2Model

        super().__init__(audio, fps)
        self.model = Wav2Vec2Model.from_pretrained(os.fspath(model_dir), local_files_only=True)
        self.model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.feature_dim = self.model.config.hidden_size
        self.history_frames = history_frames
        self.normalize = _reads_do_normalize(model_dir)

    @torch.no_grad()
    def frame_features(self, samples: np.ndarray, first_frame: int, last_frame: int, offset: int) -> torch.Tensor:
        window_first = max(0, first_frame - self.history_frames)
        x = torch.from_numpy(samples[window_first * self.hop - offset :]).to(self.device)
        if self.normalize:  # per-window zero mean / unit variance, as Wav2Vec2FeatureExtractor does per input
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        hidden = self.model(x[None].to(self.dtype)).last_hidden_state  # (1, T, D) at ~50 Hz
        frames_in_window = last_frame - window_first + 1
        per_frame = torch.nn.functional.interpolate(
            hidden.float().transpose(1, 2), size=frames_in_window, mode="linear", align_corners=True
        )[0].T
        return per_frame[first_frame - window_first :].cpu()


def _reads_do_normalize(model_dir: str | os.PathLike) -> bool:
    """The feature extractor's `do_normalize` from preprocessor_config.json (True when absent)."""
    path = os.path.join(os.fspath(model_dir), "preprocessor_config.json")
    if not os.path.exists(path):
        return True
    with open(path) as f:
        return bool(json.load(f).get("do_normalize", True))


def build_featurizer(preset: Preset, model_dir: str | os.PathLike | None = None) -> AudioFeaturizer:
    """The featurizer a preset asks for; wav2vec2 needs the local directory of its weights."""
    if preset.audio.encoder == "logmel":
        featurizer: AudioFeaturizer = LogMelFeaturizer(preset.audio, preset.video.fps)
    elif preset.audio.encoder == "wav2vec2":
        if model_dir is None:
            raise ValueError(f"preset {preset.name!r} uses wav2vec2: pass the directory of its weights")
        featurizer = Wav2Vec2Featurizer(model_dir, preset.audio, preset.video.fps)
    else:
        raise ValueError(f"unknown audio encoder {preset.audio.encoder!r}")
    if featurizer.feature_dim != preset.dit.audio_feature_dim:
        raise ValueError(
            f"audio features are {featurizer.feature_dim}-d but preset {preset.name!r} expects "
            f"{preset.dit.audio_feature_dim}"
        )
    if featurizer.audio_window(preset.vae.temporal_stride) != preset.dit.audio_window:
        raise ValueError(f"audio window mismatch for preset {preset.name!r}")
    return featurizer
