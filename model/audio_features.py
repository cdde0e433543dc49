"""Speech -> one feature vector per video frame, packed per latent frame (DESIGN 3.2).

Timing. Video frame i spans [i/fps, (i+1)/fps); its feature may use audio only up to the frame's end.
The VAE's temporal stride s maps latent frame 0 to video frame 0 and latent frame k >= 1 to video frames
s*k-s+1 .. s*k. Latent frame k is conditioned on a window of `audio_window = s + context_frames + lookahead_frames`
feature vectors ending `lookahead_frames` (L) after its last covered frame (e_k = s*k, or 0 for k = 0), i.e. frames
e_k + L - audio_window + 1 .. e_k + L; frames before the start of the audio (negative indices) are zero vectors.
A generation block's features are computed from the samples before the block's end plus L frames only, so they are
the same whether the rest of the speech is known yet or not (streaming-safe: a stream waits L frames longer).

The exception is OmniAvatar's wav2vec2 path (`encoder: omniavatar`, LiveTalk): its transformer encodes the whole
clip at once, so its features (`ClipFeatures`) need the whole audio and are computed over the clip, or for very long
audio over overlapping windows of it. `FrameFeatures` wraps per-video-frame features computed elsewhere (training
data, reference fixtures). Both are packed per latent frame by `pack_latent_windows`, the same rule as above.
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


def window_frame_indices(
    first_latent: int, num_latent: int, temporal_stride: int, window: int, lookahead: int = 0
) -> torch.Tensor:
    """(num_latent, window) video frame indices of each latent frame's window, which ends `lookahead` frames after
    the latent frame's last video frame (negative indices: before the audio)."""
    latents = range(first_latent, first_latent + num_latent)
    ends = torch.tensor([last_video_frame(k, temporal_stride) + lookahead for k in latents])
    return ends[:, None] - window + 1 + torch.arange(window)


def pack_latent_windows(
    feats: torch.Tensor, feats_first_frame: int, frames: torch.Tensor, front_padding: str
) -> torch.Tensor:
    """Gather `frames` (any shape of video frame indices) from per-frame `feats` whose row 0 is video frame
    `feats_first_frame`. Frames before the audio's start are zero vectors, or copies of frame 0's features."""
    before = frames < 0
    if front_padding == "first_frame":
        frames = frames.clamp_min(0)
    rows = feats[(frames.clamp_min(feats_first_frame) - feats_first_frame)]
    if front_padding == "zeros":
        rows = rows.masked_fill(before[..., None], 0.0)
    return rows.contiguous()


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
        self.lookahead_frames = audio.lookahead_frames
        self.front_padding = audio.front_padding

    whole_clip = False  # True: features need the whole audio (see ClipFeatures), not a streaming window

    def audio_window(self, temporal_stride: int) -> int:
        return temporal_stride + self.context_frames + self.lookahead_frames

    @abstractmethod
    def frame_features(self, samples: np.ndarray, first_frame: int, last_frame: int, offset: int) -> torch.Tensor:
        """Features (last_frame - first_frame + 1, feature_dim) of video frames first..last (first >= 0).

        `samples[0]` is stream sample `offset` (at most `(first_frame - history_frames) * hop`, or 0), and
        `samples` ends exactly at the end of `last_frame` ((last_frame + 1) * hop).
        """

    history_frames: int  # video frames before `first_frame` whose audio frame_features reads

    def first_sample_needed(self, first_latent: int, temporal_stride: int) -> int:
        """The earliest sample a block starting at `first_latent` reads (earlier audio may be dropped)."""
        last_frame = last_video_frame(first_latent, temporal_stride) + self.lookahead_frames
        first_frame = last_frame - self.audio_window(temporal_stride) + 1
        return max(0, (max(first_frame, 0) - self.history_frames) * self.hop)

    def block_features(
        self, samples: np.ndarray, first_latent: int, num_latent: int, temporal_stride: int, offset: int = 0
    ) -> torch.Tensor:
        """(num_latent, audio_window, feature_dim) float32 for latent frames first_latent .. +num_latent-1.

        `samples`: mono audio at `sample_rate` whose first sample is sample `offset` of the stream (0: from time 0;
        a streaming caller may drop what `first_sample_needed` says no block reads any more). Only samples before
        the block's end plus `lookahead_frames` are read, and missing ones (audio shorter than that) count as
        silence. The cost does not depend on the block's position in the stream.
        """
        if num_latent < 1 or first_latent < 0:
            raise ValueError(f"need first_latent >= 0 and num_latent >= 1, got {first_latent}, {num_latent}")
        window = self.audio_window(temporal_stride)
        frames = window_frame_indices(first_latent, num_latent, temporal_stride, window, self.lookahead_frames)
        first_frame, last_frame = int(frames[0, 0]), int(frames[-1, -1])
        start_sample = self.first_sample_needed(first_latent, temporal_stride)
        if offset > start_sample:
            raise ValueError(f"the block needs audio from sample {start_sample}, but samples start at {offset}")
        end_sample = (last_frame + 1) * self.hop
        block_samples = np.zeros(end_sample - start_sample, dtype=np.float32)
        available = np.asarray(samples[start_sample - offset : end_sample - offset], dtype=np.float32)
        block_samples[: len(available)] = available

        computed_from = max(first_frame, 0)
        feats = self.frame_features(block_samples, computed_from, last_frame, start_sample).float()
        return pack_latent_windows(feats, computed_from, frames, self.front_padding)


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


class OmniAvatarFeaturizer(AudioFeaturizer):
    """OmniAvatar's (and LiveTalk's) wav2vec2 features of a whole clip, one vector per video frame.

    The waveform is normalised as `Wav2Vec2FeatureExtractor(do_normalize=True)` does, the conv features are linearly
    interpolated (align_corners) to the clip's video frame count before the feature projection and the encoder, and
    the last hidden state is concatenated with every hidden state (embeddings included) on the feature axis: for
    wav2vec2-base, 14 x 768 = 10752. A clip of T video frames spans (T - 1) frame durations of audio, as in the
    reference (whose clips are 3n+2 seconds: T = 16 s + 1 frames at 16 fps).
    """

    whole_clip = True
    NORMALIZE_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean unit-variance epsilon

    def __init__(
        self,
        model_dir: str | os.PathLike,
        audio: AudioConfig,
        fps: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import Wav2Vec2Model

        super().__init__(audio, fps)
        self.model = Wav2Vec2Model.from_pretrained(os.fspath(model_dir), local_files_only=True)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.feature_dim = self.model.config.hidden_size * (self.model.config.num_hidden_layers + 2)
        self.normalize = _reads_do_normalize(model_dir)
        self.history_frames = 0
        self.window_frames = round(audio.window_seconds * fps)
        self.window_context = round(audio.window_context_seconds * fps)

    def frame_features(self, samples: np.ndarray, first_frame: int, last_frame: int, offset: int) -> torch.Tensor:
        raise TypeError("OmniAvatar features are computed over a whole clip: use clip_features()")

    def input_values(self, waveform: np.ndarray) -> np.ndarray:
        """Wav2Vec2FeatureExtractor's normalisation (numpy float32, as it computes it)."""
        waveform = np.asarray(waveform, dtype=np.float32)
        if not self.normalize:
            return waveform
        return (waveform - waveform.mean()) / np.sqrt(waveform.var() + self.NORMALIZE_EPS)

    @torch.no_grad()
    def encode(self, waveform: np.ndarray, num_frames: int) -> torch.Tensor:
        """(num_frames, feature_dim) float32 features of one waveform stretched over `num_frames` video frames."""

        def stretch(module, args, conv):  # (1, C, T') conv features -> (1, C, num_frames), before the projection
            return torch.nn.functional.interpolate(conv, size=num_frames, mode="linear", align_corners=True)

        x = torch.from_numpy(self.input_values(waveform))[None].to(self.device, self.dtype)
        hook = self.model.feature_extractor.register_forward_hook(stretch)
        try:
            out = self.model(x, output_hidden_states=True)
        finally:
            hook.remove()
        return torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)[0].float().cpu()

    def clip_features(self, samples: np.ndarray, num_frames: int) -> ClipFeatures:
        """The features of a clip of `num_frames` video frames whose audio is `samples` (padded with silence or cut
        to the clip's (num_frames - 1) frame durations), computed on demand window by window."""
        return ClipFeatures(self, samples, num_frames)


class FrameFeatures:
    """Per-video-frame features known in advance ((T, D) for frames 0 .. T-1), packed per latent frame."""

    def __init__(self, feats: torch.Tensor, front_padding: str, lookahead_frames: int = 0):
        self.feats, self.front_padding, self.lookahead_frames = feats.float(), front_padding, lookahead_frames
        self.num_frames = feats.shape[0]

    def frames(self, first: int, last: int) -> tuple[torch.Tensor, int]:
        """Features of frames first..last (clamped to the clip) and the frame index of their first row."""
        return self.feats, 0

    def block_features(self, first_latent: int, num_latent: int, temporal_stride: int, window: int) -> torch.Tensor:
        frames = window_frame_indices(first_latent, num_latent, temporal_stride, window, self.lookahead_frames)
        if int(frames.max()) >= self.num_frames:
            raise ValueError(
                f"latent frames up to {first_latent + num_latent - 1} need video frame {int(frames.max())}"
                f", but the features cover {self.num_frames} frames"
            )
        feats, first = self.frames(max(0, int(frames.min())), int(frames.max()))
        return pack_latent_windows(feats, first, frames, self.front_padding)


class ClipFeatures(FrameFeatures):
    """OmniAvatar features of one clip, computed lazily: the whole clip in one pass when it is at most
    `window_seconds` long (exactly as the reference), otherwise window by window, each window encoded with
    `window_context_seconds` of audio on both sides; only the current window's features are held."""

    def __init__(self, featurizer: OmniAvatarFeaturizer, samples: np.ndarray, num_frames: int):
        self.featurizer, self.num_frames = featurizer, num_frames
        self.front_padding, self.lookahead_frames = featurizer.front_padding, featurizer.lookahead_frames
        hop = featurizer.hop
        clip = np.zeros((num_frames - 1) * hop, dtype=np.float32)
        clip[: min(len(samples), clip.size)] = np.asarray(samples[: clip.size], dtype=np.float32)
        self.samples = clip
        self._window: tuple[int, torch.Tensor] | None = None  # (window index, its core frames' features)

    def frames(self, first: int, last: int) -> tuple[torch.Tensor, int]:
        size = self.featurizer.window_frames
        if self.num_frames <= size:
            return self._encoded(0), 0
        index = first // size
        if last >= (index + 1) * size:  # a block straddling two windows: encode its span on its own
            return self._encode_span(first, last), first
        return self._encoded(index), index * size

    def _encoded(self, index: int) -> torch.Tensor:
        if self._window is None or self._window[0] != index:
            size = self.featurizer.window_frames
            first, last = index * size, min(self.num_frames, (index + 1) * size) - 1
            self._window = (index, self._encode_span(first, last))
        return self._window[1]

    def _encode_span(self, first: int, last: int) -> torch.Tensor:
        """Features of frames first..last, encoded with the window context on both sides (none past the clip)."""
        context = self.featurizer.window_context if self.num_frames > self.featurizer.window_frames else 0
        start, end = max(0, first - context), min(self.num_frames - 1, last + context)
        hop = self.featurizer.hop
        feats = self.featurizer.encode(self.samples[start * hop : end * hop], end - start + 1)
        return feats[first - start : last - start + 1]


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
    elif preset.audio.encoder in ("wav2vec2", "omniavatar"):
        if model_dir is None:
            raise ValueError(f"preset {preset.name!r} uses wav2vec2: pass the directory of its weights")
        kind = Wav2Vec2Featurizer if preset.audio.encoder == "wav2vec2" else OmniAvatarFeaturizer
        featurizer = kind(model_dir, preset.audio, preset.video.fps)
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
