"""Regenerate the bundled example manifest (`make examples`): SynthTalk clips and one real portrait.

Three SynthTalk portraits with formant speech, each with its ground-truth video (`truth_video`: the report scores the
render's PSNR against it beside the still portrait's), and `skimage.data.astronaut()` (a real photo shipped with
scikit-image) speaking espeak-ng speech. `make demo` renders them.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from model.config import get_preset
from model.media.audio import save_wav
from model.media.video import VideoWriter
from model.synth import make_clip
from model.synth.world import make_speech

HERE = Path(__file__).parent
SECONDS = 4.0
SEED = 2026
TRUTH_CRF = 10  # near-lossless: the truth should not carry much more coding loss than the render's mp4


def main() -> None:
    rows = []
    for i in range(3):
        size = get_preset("tiny").video.height  # the bundled model's resolution
        clip = make_clip(SEED + i, SECONDS, size=size, identity_seed=900_000 + i, speaker_seed=900_000 + i)
        name = f"synth-{i}"
        Image.fromarray(clip.portrait).save(HERE / f"{name}.png")
        save_wav(HERE / f"{name}.wav", clip.audio, clip.sample_rate)
        with VideoWriter(HERE / f"{name}.truth.mp4", clip.fps, size, size, crf=TRUTH_CRF) as truth:
            truth.write(clip.frames)
        rows.append({"id": name, "portrait": f"{name}.png", "audio": f"{name}.wav", "truth_video": f"{name}.truth.mp4"})

    from skimage.data import astronaut

    Image.fromarray(astronaut()).save(HERE / "astronaut.jpg", quality=90)
    speech = make_speech("espeak", SEED, SECONDS, speaker_seed=SEED)
    save_wav(HERE / "astronaut.wav", speech.samples, speech.sample_rate)
    rows.append(
        {
            "id": "astronaut",
            "portrait": "astronaut.jpg",
            "audio": "astronaut.wav",
            "prompt": "an astronaut talking to the camera",
        }
    )
    with open(HERE / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {HERE / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
