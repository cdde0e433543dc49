"""SynthTalk clips -> training tensors: video frames, VAE latents, the portrait's latent, audio features per
latent frame.

Identities, speakers and content are drawn from seed ranges disjoint from the validation and held-out clips'
(`model.eval.heldout`; `DataConfig` refuses a config that would reach them), so those faces and voices are never seen
in training. Audio features come
from the preset's featurizer through `block_features`, exactly as the generator computes them for a block, so
training and generation agree frame by frame.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.audio_features import build_featurizer
from model.config import Preset
from model.eval.heldout import VALIDATION
from model.synth import RENDER_VERSION, Clip, Framing, SpeechKind, make_clip
from model.vae import WanVAE, frames_to_tensor

_CONTENT_SEEDS_PER_DATA_SEED = 100_000
_FRAMING_STREAM = 77  # the random streams of a training clip's framing and speech, apart from SynthTalk's own
_SPEECH_STREAM = 78


class DataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data_seed: int = 0  # what is said, head motion, blinks: clip i uses data_seed * _CONTENT_SEEDS_PER_DATA_SEED + i
    num_clips: int = 128
    seconds: float = 4.0
    # Many faces, so the DiT learns to copy the reference sink rather than memorise faces (evaluation faces are new).
    num_identities: int = 128  # training faces: identity seeds [identity_base, identity_base + n)
    num_speakers: int = 64
    identity_base: int = 1000  # validation and held-out faces and voices (model.eval.heldout) are far above these
    speaker_base: int = 5000
    # Scale of the idle head motion (SynthTalk's random sway, which nothing in a render's inputs predicts); 0: the
    # head stays at the portrait's pose and only the mouth and the eyes move.
    head_motion: float = 1.0
    # This fraction of the clips frames the head otherwise (`Framing`: zoom 0.5-1, moved up to 0.25 of the picture
    # up and 0.12 sideways, as in photos like skimage's astronaut); the rest, and every evaluation clip, as the seed
    # draws it.
    framed_fraction: float = 0.0
    # This fraction of the clips speaks espeak-ng's phonetic English (`model.synth.espeak`), the rest SynthTalk's
    # formant voices: real speech's spectra and timing in training (the bundled model heard formant speech only, and
    # its lip-sync on espeak clips is below its formant one; docs/results.md). espeak-ng's samples are reproducible
    # only up to a small residue, so a run keeps the clips it made (`cached_training_clips`).
    espeak_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _below_the_evaluation_seeds(self) -> DataConfig:
        # Validation's seeds are the lowest of the evaluation splits: staying below them stays below all of them.
        ranges = {
            "identity": (self.identity_base + self.num_identities, VALIDATION.identity_base),
            "speaker": (self.speaker_base + self.num_speakers, VALIDATION.speaker_base),
            "content": (self.data_seed * _CONTENT_SEEDS_PER_DATA_SEED + self.num_clips, VALIDATION.content_base),
        }
        for name, (end, evaluation_start) in ranges.items():
            if end > evaluation_start:
                raise ValueError(
                    f"training {name} seeds reach {end - 1}, into the evaluation seeds from {evaluation_start}"
                )
        if self.num_clips > _CONTENT_SEEDS_PER_DATA_SEED:
            raise ValueError(f"num_clips {self.num_clips} > {_CONTENT_SEEDS_PER_DATA_SEED}: data seeds would overlap")
        return self


def clip_framing(data: DataConfig, index: int) -> Framing:
    """Training clip `index`'s framing: the default, or (for `framed_fraction` of them) one drawn from its seed."""
    rng = np.random.default_rng([data.data_seed, index, _FRAMING_STREAM])
    if rng.random() >= data.framed_fraction:
        return Framing()
    zoom = float(np.exp(rng.uniform(np.log(0.5), 0.0)))
    return Framing(zoom=zoom, dx=float(rng.uniform(-0.12, 0.12)), dy=float(rng.uniform(-0.25, 0.05)))


def clip_speech(data: DataConfig, index: int) -> SpeechKind:
    """Training clip `index`'s speech: espeak-ng for `espeak_fraction` of the clips (drawn by seed), else formant."""
    rng = np.random.default_rng([data.data_seed, index, _SPEECH_STREAM])
    return "espeak" if rng.random() < data.espeak_fraction else "formant"


def training_clips(data: DataConfig, size: int) -> list[Clip]:
    """Clip i: identity i mod n_id, speaker (i // n_id + i) mod n_spk, so faces and voices mix."""
    clips = []
    for i in range(data.num_clips):
        identity = data.identity_base + i % data.num_identities
        speaker = data.speaker_base + (i // data.num_identities + i) % data.num_speakers
        clips.append(
            make_clip(
                data.data_seed * _CONTENT_SEEDS_PER_DATA_SEED + i,
                data.seconds,
                size,
                speech=clip_speech(data, i),
                identity_seed=identity,
                speaker_seed=speaker,
                head_motion=data.head_motion,
                framing=clip_framing(data, i),
            )
        )
    return clips


def cached_training_clips(data: DataConfig, size: int, directory: Path) -> list[Clip]:
    """`training_clips`, kept in `directory` (one .npy file per array, keyed by the config) so a resumed run gets the
    very clips it started with, in seconds instead of minutes. Delete the files to regenerate them after a change to
    SynthTalk."""
    spec = {"data": data.model_dump(), "size": size, "render_version": RENDER_VERSION}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    base = Path(directory) / f"clips-{key[:12]}"
    names = ("frames", "portraits", "audio")
    if all(base.with_suffix(f".{n}.npy").exists() for n in names) and base.with_suffix(".json").exists():
        frames, portraits, audio = (np.load(base.with_suffix(f".{n}.npy"), mmap_mode="r") for n in names)
        meta = json.loads(base.with_suffix(".json").read_text())
        return [
            Clip(
                id=m["id"],
                portrait=np.array(portraits[i]),
                audio=np.array(audio[i]),
                frames=np.array(frames[i]),
                truth=m["truth"],
                sample_rate=m["sample_rate"],
                fps=m["fps"],
            )
            for i, m in enumerate(meta)
        ]
    clips = training_clips(data, size)
    base.parent.mkdir(parents=True, exist_ok=True)
    for name, values in zip(names, ([c.frames for c in clips], [c.portrait for c in clips], [c.audio for c in clips])):
        tmp = base.with_suffix(f".{name}.tmp.npy")
        np.save(tmp, np.stack(values))
        tmp.replace(base.with_suffix(f".{name}.npy"))
    meta = [{"id": c.id, "truth": c.truth, "sample_rate": c.sample_rate, "fps": c.fps} for c in clips]
    base.with_suffix(".json").write_text(json.dumps(meta))
    return clips


def usable_frames(num_frames: int, temporal_stride: int) -> int:
    """Largest 1 + s*k <= num_frames: the VAE takes 1 + s*k frames."""
    return 1 + (num_frames - 1) // temporal_stride * temporal_stride


def clip_video(clip: Clip, temporal_stride: int) -> torch.Tensor:
    """(1, 3, 1+s*k, H, W) in [-1, 1]."""
    return frames_to_tensor(clip.frames[: usable_frames(len(clip.frames), temporal_stride)])


@dataclass
class LatentClip:
    latents: torch.Tensor  # (C, F, h, w) normalised VAE latents of the clip
    reference: torch.Tensor  # (C, 1, h, w) the portrait's latent
    audio: torch.Tensor  # (F, audio_window, feature_dim), latent frame k's window as the generator builds it


def encode_clip(clip: Clip, vae: WanVAE, preset: Preset, featurizer=None) -> LatentClip:
    featurizer = featurizer or build_featurizer(preset)
    stride = preset.vae.temporal_stride
    with torch.no_grad():
        latents = vae.encode(clip_video(clip, stride))[0]
        reference = vae.encode(frames_to_tensor(clip.portrait[None]))[0]
    audio = featurizer.block_features(clip.audio, 0, latents.shape[1], stride)
    return LatentClip(latents.float(), reference.float(), audio.float())


@dataclass
class Batch:
    """Windows of consecutive latent frames, all starting right after the sink (training positions)."""

    latents: torch.Tensor  # (B, C, F, h, w)
    reference: torch.Tensor  # (B, C, 1, h, w)
    audio: torch.Tensor  # (B, F, A, D)


class LatentDataset:
    """Random windows of `frames` consecutive latent frames from encoded clips."""

    def __init__(self, clips: list[LatentClip]):
        if not clips:
            raise ValueError("no clips")
        self.clips = clips

    def sample(self, batch: int, frames: int, rng: np.random.Generator, from_start: bool = False) -> Batch:
        """`batch` windows of `frames` latent frames, each from a random clip at a random start (`from_start`: at the
        clip's first latent frame, the one the VAE encodes from a single video frame, as a render's first block)."""
        picks = []
        for _ in range(batch):
            clip = self.clips[int(rng.integers(len(self.clips)))]
            total = clip.latents.shape[1]
            if frames > total:
                raise ValueError(f"window of {frames} latent frames > clip of {total}")
            start = 0 if from_start else int(rng.integers(total - frames + 1))
            picks.append((clip.latents[:, start : start + frames], clip.reference, clip.audio[start : start + frames]))
        latents, reference, audio = (torch.stack(x) for x in zip(*picks))
        return Batch(latents, reference, audio)

    def save(self, path) -> None:
        torch.save([(c.latents, c.reference, c.audio) for c in self.clips], path)

    @classmethod
    def load(cls, path) -> LatentDataset:
        return cls([LatentClip(*row) for row in torch.load(path, weights_only=True)])


def conditioning(reference: torch.Tensor, frames: int, is_reference: bool) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, C+1, frames, h, w): reference latent | mask, as the generator builds it."""
    ref = reference.expand(-1, -1, frames, -1, -1)
    return torch.cat([ref, torch.full_like(ref[:, :1], 1.0 if is_reference else 0.0)], dim=1)
