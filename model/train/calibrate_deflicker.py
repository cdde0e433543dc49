"""Choose the deflicker threshold (`generator.deflicker.threshold`) of a trained model, on training clips.

    python -m model.train.calibrate_deflicker --checkpoint model/weights/tiny --clips 8 --seconds 8

The deflicker (model/deflicker.py) spreads a latent-frame crossing's jump wherever a pixel changes by less than the
threshold. Too low a threshold leaves the VAE's seams; too high a one smears real motion (the mouth) over time. The
measure is `latent_seam_jitter`, the seam ratio at the latent-frame crossings *inside* the generator's blocks: only the
VAE makes seams there, so the right threshold brings it to 1.0 (seamless; below 1.0 the crossings change less than
their neighbours, i.e. real change is being smeared). The threshold nearest 1.0 is chosen. Clips come from the
training faces and voices: the held-out set, which judges the result, is not used to choose it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from model.config import DeflickerConfig
from model.eval import metrics, score
from model.eval.heldout import render_clip
from model.generator import AvatarModel, RenderSettings
from model.synth import load_truth_phones
from model.train.data import DataConfig, training_clips

THRESHOLDS = (16.0, 24.0, 32.0, 40.0, 48.0, 64.0)  # grey levels: from below the tiny VAE's seams to well into motion


def calibrate(
    model: AvatarModel,
    thresholds: list[float],
    clips: int,
    seconds: float,
    data: DataConfig | None = None,
    progress=print,
) -> dict:
    """Render `clips` training clips of `seconds` at every threshold; returns the means per threshold and the choice."""
    # In SynthTalk's default framing: the seams and the lip-sync are read with the pixel mouth locator, which looks
    # for the mouth where that framing puts it.
    data = (data or DataConfig()).model_copy(update={"num_clips": clips, "seconds": seconds, "framed_fraction": 0.0})
    preset = model.preset
    stride = preset.vae.temporal_stride
    layout = metrics.block_layout(stride, preset.generator.frames_per_block)
    frames = preset.generator.deflicker.frames or stride - 1
    rows: dict[float, list[dict]] = {t: [] for t in thresholds}
    try:
        for i, clip in enumerate(training_clips(data, preset.video.height)):
            phones = load_truth_phones(clip.truth)
            for threshold in thresholds:
                deflicker = DeflickerConfig(frames=frames, threshold=threshold)
                model.preset = preset.with_generator(deflicker=deflicker)
                # Seams as the decoder makes them: the paste-back would hide them wherever nothing moved.
                video = render_clip(model, clip, RenderSettings(seed=i, paste_back=False))
                result = score(video, clip.fps, clip.portrait, clip.audio, phones=phones, **layout)
                rows[threshold].append(
                    {
                        "lipsync_r": result["lipsync_r"],
                        "boundary_jitter": result["boundary_jitter"],
                        "latent_seam_jitter": metrics.latent_seam_jitter(video, stride, **layout),
                    }
                )
            progress(f"clip {i}: done")
    finally:
        model.preset = preset
    table = {t: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for t, rs in rows.items()}
    best = min(thresholds, key=lambda t: abs(table[t]["latent_seam_jitter"] - 1.0))
    return {"frames": frames, "clips": clips, "seconds": seconds, "by_threshold": table, "chosen_threshold": best}


def threshold_cli(
    description: str, calibrate, thresholds: tuple[float, ...], clips: int, seconds: float, argv: list[str] | None
) -> None:
    """The command line of a threshold calibration: `calibrate(model, thresholds, clips, seconds, progress)`'s result
    as JSON on stdout, progress on stderr."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: the bundled model)")
    parser.add_argument("--clips", type=int, default=clips)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument(
        "--thresholds", default=",".join(f"{t:g}" for t in thresholds), help="grey levels (0-255), comma-separated"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = calibrate(
        AvatarModel.load(args.checkpoint),
        [float(t) for t in args.thresholds.split(",")],
        args.clips,
        args.seconds,
        progress=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    threshold_cli(__doc__.splitlines()[0], calibrate, THRESHOLDS, clips=8, seconds=8.0, argv=argv)


if __name__ == "__main__":
    main()
