"""Evaluate a checkpoint on SynthTalk identities and speakers never seen in training (model.eval metrics).

    python -m model.train.heldout --checkpoint model/weights/tiny --clips 2 --seconds 8 --out runs/tiny/eval/default.json

Per clip it renders with the real generator (any step plan / t_mci override), scores the video with `model.eval.score`
against the truth phones, and scores two references on the same clip: the VAE's own reconstruction of the
ground-truth frames (the floor for identity_error) and the still portrait repeated (what "no model" would give).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from model.eval import score
from model.generator import AvatarModel, RenderSettings
from model.synth import load_truth_phones
from model.train.data import DataConfig, eval_clip
from model.train.vae import reconstruction_error

KEYS = ("lipsync_r", "av_offset_frames", "identity_error", "boundary_jitter")


def _metrics(result: dict) -> dict:
    return {k: result[k] for k in KEYS}


def mean_rows(rows: list[dict]) -> dict:
    out = {}
    for k in KEYS:
        values = [r[k] for r in rows if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = float(np.mean(values)) if values else None
    return out


def evaluate_checkpoint(checkpoint: str | None, clips: int, seconds: float, speech: str = "formant",
                        step_plan: tuple[int, ...] | None = None, t_mci: float | None = None,
                        data: DataConfig | None = None) -> dict:
    data = data or DataConfig()
    model = AvatarModel.load(checkpoint)
    size = model.preset.video.height
    stride = model.preset.vae.temporal_stride
    rendered, vae_rows, still_rows, seconds_taken = [], [], [], 0.0
    for i in range(clips):
        clip = eval_clip(data, i, seconds, size, speech)
        phones = load_truth_phones(clip.truth)
        started = time.monotonic()
        session = model.open(clip.portrait, None, RenderSettings(seed=i, step_plan=step_plan, t_mci=t_mci))
        session.feed_audio(clip.audio, final=True)
        frames = np.concatenate([b.frames for b in session])
        seconds_taken += time.monotonic() - started
        rendered.append(_metrics(score(frames, clip.fps, clip.portrait, clip.audio, phones=phones)))
        recon = reconstruction_error(model.vae, clip, stride)
        vae_rows.append(_metrics(score(recon, clip.fps, clip.portrait, clip.audio, phones=phones[:])))
        still = np.repeat(clip.portrait[None], len(frames), axis=0)
        still_rows.append(_metrics(score(still, clip.fps, clip.portrait, clip.audio, phones=phones)))
    return {"checkpoint": checkpoint or "bundled", "model": model.description, "clips": clips, "seconds": seconds,
            "speech": speech, "step_plan": list(step_plan or model.preset.generator.step_plan),
            "t_mci": model.preset.generator.t_mci if t_mci is None else t_mci, "render_seconds": round(seconds_taken, 1),
            "model_metrics": mean_rows(rendered), "vae_reconstruction": mean_rows(vae_rows),
            "still_portrait": mean_rows(still_rows), "per_clip": rendered}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: the bundled model)")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--speech", choices=["formant", "espeak"], default="formant")
    parser.add_argument("--step-plan", default=None, help="e.g. 4 (PSB off) or 8,6,4")
    parser.add_argument("--t-mci", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    plan = tuple(int(s) for s in args.step_plan.split(",")) if args.step_plan else None
    result = evaluate_checkpoint(args.checkpoint, args.clips, args.seconds, args.speech, plan, args.t_mci)
    result["command"] = "python -m model.train.heldout " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
