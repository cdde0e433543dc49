"""SynthTalk clips: a face, a voice and ground truth for every frame, and data sets written to disk.

A clip is fully determined by three seeds: `identity_seed` (the face), `speaker_seed` (the voice) and
`seed` (what is said, head motion, blinks). Keeping them apart lets training hold out unseen faces and
unseen voices independently.

On disk (`write_dataset`), per clip `<id>/portrait.png`, `<id>/audio.wav`, `<id>/video.mp4` (the
ground-truth video muxed with its audio), `<id>/truth.json`, and one `manifest.jsonl` whose paths are
relative to the manifest's own directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from model.synth.articulation import MOUTH_PARAMS, mouth_track
from model.synth.face import DEFAULT_FRAMING, POSE_PARAMS, Framing, Identity, idle_motion, render, render_portrait
from model.synth.phones import PhoneTiming
from model.synth.speech import SAMPLE_RATE, Speech, formant_speech

FPS = 25
TRUTH_VERSION = 1
# What a seed renders to: bumped whenever SynthTalk draws differently, so caches of rendered clips are not reused.
# 2: 128x128 worlds with natural-image textures, teeth and framing.
RENDER_VERSION = 2
SpeechKind = Literal["formant", "espeak"]
_RENDER_CHUNK = 250  # frames rendered per batch: bounds memory for long clips


@dataclass
class Clip:
    id: str
    portrait: np.ndarray  # uint8 (H, W, 3): the face at rest, mouth closed
    audio: np.ndarray  # float32 mono at `sample_rate`
    frames: np.ndarray | None  # uint8 (N, H, W, 3), ground truth; None when not held (`make_clip(with_frames=False)`)
    truth: dict = field(repr=False)  # see `truth_dict`
    sample_rate: int = SAMPLE_RATE
    fps: int = FPS
    render_chunks: Callable[[], Iterator[np.ndarray]] | None = field(default=None, repr=False)

    def chunks(self) -> Iterator[np.ndarray]:
        """The ground-truth frames in order, `_RENDER_CHUNK` at a time: slices of `frames` when it is held, else
        rendered again chunk by chunk, so a clip too long to hold can still be compared frame by frame."""
        if self.frames is not None:
            return (self.frames[i : i + _RENDER_CHUNK] for i in range(0, len(self.frames), _RENDER_CHUNK))
        if self.render_chunks is None:
            raise ValueError(f"clip {self.id} holds no frames and cannot render them")
        return self.render_chunks()


def make_speech(kind: SpeechKind, seed: int, seconds: float, speaker_seed: int) -> Speech:
    if kind == "formant":
        return formant_speech(seed, seconds, SAMPLE_RATE, speaker_seed=speaker_seed)
    if kind == "espeak":
        from model.synth.espeak import espeak_speech

        return espeak_speech(seed, seconds, SAMPLE_RATE, speaker_seed=speaker_seed)
    raise ValueError(f"speech must be 'formant' or 'espeak', got {kind!r}")


def truth_dict(phones: list[PhoneTiming], mouth: np.ndarray, pose: np.ndarray, blink: np.ndarray, meta: dict) -> dict:
    """The truth file: phone timings (s) and per-frame columns (frame k shows time (k + 0.5) / fps)."""
    columns = {name: mouth[:, j] for j, name in enumerate(MOUTH_PARAMS)}
    columns |= {name: pose[:, j] for j, name in enumerate(POSE_PARAMS)}
    columns["blink"] = blink
    return {
        "version": TRUTH_VERSION,
        **meta,
        "phones": [p.to_json() for p in phones],
        "frames": {name: np.round(values.astype(float), 5).tolist() for name, values in columns.items()},
    }


def load_truth_phones(truth: dict) -> list[PhoneTiming]:
    return [PhoneTiming.from_json(row) for row in truth["phones"]]


def make_clip(
    seed: int,
    seconds: float,
    size: int = 64,
    speech: SpeechKind = "formant",
    identity_seed: int | None = None,
    speaker_seed: int | None = None,
    clip_id: str | None = None,
    freeze_mouth: bool = False,
    head_motion: float = 1.0,
    framing: Framing = DEFAULT_FRAMING,
    with_frames: bool = True,
) -> Clip:
    """One clip. `freeze_mouth` keeps the mouth at rest whatever is said (a lip-sync negative control);
    `head_motion` scales the idle head motion (0: the head stays at the portrait's pose; blinks are unchanged);
    `framing` places the head in the picture (portrait and frames alike). `with_frames=False` leaves `frames` None
    (`Clip.chunks` renders them when asked): memory for the audio and the truth only, however long the clip."""
    identity_seed = seed if identity_seed is None else identity_seed
    speaker_seed = seed if speaker_seed is None else speaker_seed
    num_frames = int(round(seconds * FPS))
    voice = make_speech(speech, seed, seconds, speaker_seed)
    identity = Identity.from_seed(identity_seed)
    mouth = mouth_track(voice.phones, num_frames, FPS)
    if freeze_mouth:
        mouth[:] = mouth_track([], 1, FPS)[0]
    pose, blink = idle_motion(seed, num_frames, FPS)
    pose = np.concatenate([pose[:, :3] * head_motion, 1 + (pose[:, 3:] - 1) * head_motion], axis=1).astype(np.float32)

    def render_chunks() -> Iterator[np.ndarray]:
        for i in range(0, num_frames, _RENDER_CHUNK):
            span = slice(i, i + _RENDER_CHUNK)
            yield render(identity, pose[span], mouth[span], blink[span], size, framing=framing)

    frames = None
    if with_frames:
        frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)  # filled in place: no second copy
        for i, chunk in enumerate(render_chunks()):
            frames[i * _RENDER_CHUNK : i * _RENDER_CHUNK + len(chunk)] = chunk
    meta = {
        "fps": FPS,
        "sample_rate": voice.sample_rate,
        "seconds": seconds,
        "num_frames": num_frames,
        "height": size,
        "width": size,
        "seed": seed,
        "identity_seed": identity_seed,
        "speaker_seed": speaker_seed,
        "speech": speech,
        "frozen_mouth": freeze_mouth,
        "head_motion": head_motion,
        "framing": asdict(framing),
    }
    return Clip(
        id=clip_id or f"clip-{identity_seed}-{speaker_seed}-{seed}",
        portrait=render_portrait(identity, size, framing=framing),
        audio=voice.samples,
        frames=frames,
        truth=truth_dict(voice.phones, mouth, pose, blink, meta),
        sample_rate=voice.sample_rate,
        render_chunks=render_chunks,
    )


def write_clip(clip: Clip, out_dir: str | os.PathLike) -> dict:
    """Write one clip under `out_dir/<id>/`; returns its manifest row (paths relative to `out_dir`)."""
    from PIL import Image

    from model.media.audio import save_wav
    from model.media.video import VideoWriter

    clip_dir = os.path.join(os.fspath(out_dir), clip.id)
    os.makedirs(clip_dir, exist_ok=True)
    row = {
        name: f"{clip.id}/{file}"
        for name, file in (
            ("portrait", "portrait.png"),
            ("audio", "audio.wav"),
            ("video", "video.mp4"),
            ("truth", "truth.json"),
        )
    }
    Image.fromarray(clip.portrait).save(os.path.join(out_dir, row["portrait"]))
    audio_path = os.path.join(out_dir, row["audio"])
    save_wav(audio_path, clip.audio, clip.sample_rate)
    height, width = clip.frames.shape[1:3]
    with VideoWriter(
        os.path.join(out_dir, row["video"]),
        clip.fps,
        width,
        height,
        audio_path=audio_path,
        audio_duration=len(clip.audio) / clip.sample_rate,
    ) as writer:
        writer.write(clip.frames)
    with open(os.path.join(out_dir, row["truth"]), "w") as f:
        json.dump(clip.truth, f)
    return {"id": clip.id, **row}


def write_dataset(
    out_dir: str | os.PathLike,
    clips: int,
    seconds: float,
    seed: int = 0,
    size: int = 64,
    speech: SpeechKind = "formant",
    identity_seeds: Iterable[int] | None = None,
    speaker_seeds: Iterable[int] | None = None,
    progress: bool = False,
) -> str:
    """Write `clips` clips and `out_dir/manifest.jsonl`; returns the manifest's path.

    Clip i uses content seed `seed * 1_000_003 + i` and, unless given, the same number as identity and
    speaker seed (their random streams are separate, so equal numbers are not the same randomness).
    """
    os.makedirs(out_dir, exist_ok=True)
    content_seeds = [seed * 1_000_003 + i for i in range(clips)]
    identity_seeds = list(identity_seeds) if identity_seeds is not None else content_seeds
    speaker_seeds = list(speaker_seeds) if speaker_seeds is not None else content_seeds
    if len(identity_seeds) != clips or len(speaker_seeds) != clips:
        raise ValueError(f"need {clips} identity and speaker seeds, got {len(identity_seeds)} and {len(speaker_seeds)}")
    indices: Iterable[int] = range(clips)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="synth", unit="clip")
    manifest = os.path.join(os.fspath(out_dir), "manifest.jsonl")
    with open(manifest, "w") as f:
        for i in indices:
            clip = make_clip(
                content_seeds[i], seconds, size, speech, identity_seeds[i], speaker_seeds[i], clip_id=f"clip_{i:05d}"
            )
            f.write(json.dumps(write_clip(clip, out_dir)) + "\n")
    return manifest
