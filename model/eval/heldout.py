"""Evaluate a checkpoint on SynthTalk identities and speakers never seen in training (model.eval metrics).

    python -m model.eval.heldout --checkpoint model/weights/tiny --clips 2 --seconds 8 \
        --out runs/tiny/eval/default.json
    python -m model.eval.heldout --seconds 600 --clips 1 --no-urcr --out runs/tiny/eval/no-urcr-10min.json

Per clip it renders with the real generator (any step plan / t_mci override, URCR and the deflicker on or off),
scores the video with `model.eval.score` against the truth phones, and scores two references on the same clip: the
VAE's own reconstruction of the ground-truth frames (the floor for identity_error) and the still portrait repeated
(what "no model" would give).
The per-30-second windows of every clip are compared with its first window (`drift_check`, the drift test).
The held-out clips are `HeldOutSet`'s: faces, voices and content seeds that training never draws from.
A bidirectional teacher is evaluated the same way through `python -m model.train.teacher` (its own sampler).

Evaluation imports nothing from `model.train`: training may use it (the recipe's gate and calibration), not the
other way round.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.eval import metrics, score
from model.generator import AvatarModel, RenderSettings
from model.scheduler import StepPlan
from model.synth import Clip, load_truth_phones, make_clip
from model.vae import WanVAE, frames_to_tensor, tensor_to_frames

KEYS = ("lipsync_r", "av_offset_frames", "identity_error", "boundary_jitter")
ROW_KEYS = KEYS + ("latent_seam_jitter",)
DRIFT_TOLERANCE = 0.10  # a window may be at most 10% worse than the first (the drift target)

# render(model, clip, clip_index) -> uint8 frames (N, H, W, 3)
Render = Callable[[AvatarModel, Clip, int], np.ndarray]


class HeldOutSet(BaseModel):
    """The held-out clips: clip i has identity `identity_base + i`, speaker `speaker_base + i` and content seed
    `content_base + i`, far from every seed training draws from (`model.train.data.DataConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity_base: int = 90_000
    speaker_base: int = 95_000
    content_base: int = 10_000_000

    def clip(self, index: int, seconds: float, size: int, speech: str = "formant") -> Clip:
        return make_clip(
            self.content_base + index,
            seconds,
            size,
            speech=speech,
            identity_seed=self.identity_base + index,
            speaker_seed=self.speaker_base + index,
        )


HELD_OUT = HeldOutSet()


def render_clip(model: AvatarModel, clip: Clip, settings: RenderSettings) -> np.ndarray:
    """A clip's whole video, uint8 (N, H, W, 3), rendered by the real generator from its portrait and audio."""
    session = model.open(clip.portrait, None, settings)
    session.feed_audio(clip.audio, final=True)
    return np.concatenate([b.frames for b in session])


def _metrics(result: dict, frames: np.ndarray, temporal_stride: int, layout: dict) -> dict:
    return {
        **{k: result[k] for k in KEYS},
        "latent_seam_jitter": metrics.latent_seam_jitter(frames, temporal_stride, **layout),
    }


def generator_render(settings: RenderSettings) -> Render:
    """Render through the real generator with these settings; the clip index is the seed."""

    def render(model: AvatarModel, clip: Clip, index: int) -> np.ndarray:
        return render_clip(model, clip, settings.model_copy(update={"seed": index}))

    return render


@torch.no_grad()
def reconstruct_clip(vae: WanVAE, clip: Clip) -> np.ndarray:
    """The VAE's own reconstruction of a clip (encode -> decode, as many frames as it takes: 1 + s*k), uint8 frames:
    the floor generators are judged by."""
    was_training = vae.training
    vae.eval()
    frames = clip.frames[: vae.num_video_frames(vae.num_latent_frames(len(clip.frames)))]
    recon = vae.decode(vae.encode(frames_to_tensor(frames)))
    vae.train(was_training)
    return tensor_to_frames(recon)


def startup_excess_error(
    frames: np.ndarray,
    recon: np.ndarray,
    truth: np.ndarray,
    temporal_stride: int,
    first_block_frames: int,
    block_frames: int,
) -> dict[str, float]:
    """How much worse than the VAE's own reconstruction the render is at its start: the mean absolute error against
    the truth (0-255) of the render minus that of the reconstruction, over frame 0 (the first latent frame, decoded
    alone), the next latent frame's frames, the rest of the first block, the second block, and everything after."""
    n = min(len(frames), len(recon), len(truth))
    truth = truth[:n].astype(np.float32)
    excess = np.abs(frames[:n].astype(np.float32) - truth).mean(axis=(1, 2, 3)) - np.abs(
        recon[:n].astype(np.float32) - truth
    ).mean(axis=(1, 2, 3))
    second_block = first_block_frames + block_frames
    spans = {
        "frame 0": (0, 1),
        "latent frame 1": (1, 1 + temporal_stride),
        "rest of block 0": (1 + temporal_stride, first_block_frames),
        "block 1": (first_block_frames, second_block),
        "later": (second_block, n),
    }
    return {name: float(excess[a:b].mean()) for name, (a, b) in spans.items() if b > a and a < n}


def mean_rows(rows: list[dict]) -> dict:
    out = {}
    for k in ROW_KEYS:
        values = [r[k] for r in rows if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = float(np.mean(values)) if values else None
    return out


def window_is_worse(metric: str, first: float | None, value: float | None, tolerance: float = DRIFT_TOLERANCE) -> bool:
    """Whether a window's metric is more than `tolerance` worse than the first window's.

    lipsync_r worse = lower; identity_error and boundary_jitter worse = higher; av_offset_frames is an integer count
    of frames, worse when |offset| exceeds both 1 frame (the target's bound) and (1 + tolerance) x the first |offset|.
    """
    if first is None or value is None:
        return False
    if metric == "lipsync_r":
        return value < first - tolerance * abs(first)
    if metric == "av_offset_frames":
        return abs(value) > max(1.0, (1 + tolerance) * abs(first))
    return value > (1 + tolerance) * first


def drift_check(windows: list[dict]) -> dict:
    """Every window against the first, per metric: the first value, every window's value and the windows that fail."""
    first = windows[0]
    out = {}
    for k in KEYS:
        failing = [w["start_s"] for w in windows[1:] if window_is_worse(k, first[k], w[k])]
        out[k] = {"first": first[k], "values": [w[k] for w in windows], "failing_windows_start_s": failing}
    # One window has nothing to compare with: None, not a pass.
    out["passed"] = None if len(windows) < 2 else not any(out[k]["failing_windows_start_s"] for k in KEYS)
    return out


def evaluate_checkpoint(
    checkpoint: str | None,
    clips: int,
    seconds: float,
    speech: str = "formant",
    step_plan: tuple[int, ...] | None = None,
    t_mci: float | None = None,
    urcr: bool = True,
    window_seconds: float = 30.0,
    references: bool = True,
    heldout: HeldOutSet = HELD_OUT,
    deflicker: bool = True,
    render: Render | None = None,
    sampler: str = "generator",
    progress=print,
) -> dict:
    """Score `clips` held-out clips of `seconds`. `render` replaces the generator (a teacher's sampler), named by
    `sampler` in the result; the generator's settings (step plan, t_mci, URCR, deflicker) apply only without it."""
    model = AvatarModel.load(checkpoint)
    size = model.preset.video.height
    stride = model.preset.vae.temporal_stride
    layout = metrics.block_layout(stride, model.preset.generator.frames_per_block)
    if render is None:
        render = generator_render(RenderSettings(step_plan=step_plan, t_mci=t_mci, urcr=urcr, deflicker=deflicker))
    rendered, vae_rows, still_rows, windows, checks, startup, seconds_taken = [], [], [], [], [], [], 0.0
    for i in range(clips):
        clip = heldout.clip(i, seconds, size, speech)
        phones = load_truth_phones(clip.truth)
        started = time.monotonic()
        frames = render(model, clip, i)
        seconds_taken += time.monotonic() - started
        result = score(
            frames, clip.fps, clip.portrait, clip.audio, phones=phones, window_seconds=window_seconds, **layout
        )
        rendered.append(_metrics(result, frames, stride, layout))
        windows.append(result["windows"])
        checks.append(drift_check(result["windows"]))
        if references:
            recon = reconstruct_clip(model.vae, clip)
            vae_rows.append(
                _metrics(
                    score(recon, clip.fps, clip.portrait, clip.audio, phones=phones, **layout), recon, stride, layout
                )
            )
            startup.append(startup_excess_error(frames, recon, clip.frames, stride, **layout))
            still = np.repeat(clip.portrait[None], len(frames), axis=0)
            still_rows.append(
                _metrics(
                    score(still, clip.fps, clip.portrait, clip.audio, phones=phones, **layout), still, stride, layout
                )
            )
        progress(f"clip {i}: {rendered[-1]}")
    return {
        "checkpoint": checkpoint or "bundled",
        "model": model.description,
        "heldout": heldout.model_dump(),
        "clips": clips,
        "seconds": seconds,
        "speech": speech,
        "sampler": sampler,
        "step_plan": list(step_plan or model.preset.generator.step_plan),
        "t_mci": model.preset.generator.t_mci if t_mci is None else t_mci,
        "urcr": urcr,
        "deflicker": model.preset.generator.deflicker.model_dump() if deflicker else None,
        "render_seconds": round(seconds_taken, 1),
        "model_metrics": mean_rows(rendered),
        "vae_reconstruction": mean_rows(vae_rows) if references else None,
        "still_portrait": mean_rows(still_rows) if references else None,
        "per_clip": rendered,
        "startup_excess_error": {k: float(np.mean([row[k] for row in startup])) for k in startup[0]}
        if startup
        else None,
        "window_seconds": window_seconds,
        "windows": windows,
        "drift_check": checks,
        "drift_passed": None if any(c["passed"] is None for c in checks) else all(c["passed"] for c in checks),
    }


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: the bundled model)")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--speech", choices=["formant", "espeak"], default="formant")
    parser.add_argument("--step-plan", default=None, help="e.g. 4 (PSB off) or 8,6,4")
    parser.add_argument("--t-mci", type=float, default=None)
    parser.add_argument("--no-urcr", action="store_true", help="ablation: positions grow past the trained horizon")
    parser.add_argument(
        "--no-deflicker",
        action="store_true",
        help="the decoder's frames without the preset's deflicker (generator.deflicker)",
    )
    parser.add_argument("--window-seconds", type=float, default=30.0, help="drift windows")
    parser.add_argument("--no-references", action="store_true", help="skip the VAE-reconstruction and still rows")
    parser.add_argument("--identity-base", type=int, default=HELD_OUT.identity_base, help="held-out face seeds")
    parser.add_argument("--speaker-base", type=int, default=HELD_OUT.speaker_base, help="held-out voice seeds")
    parser.add_argument("--content-base", type=int, default=HELD_OUT.content_base, help="held-out content seeds")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    return parser


def run(args: argparse.Namespace, command: str, render: Render | None = None, sampler: str = "generator") -> dict:
    """The command line's evaluation: evaluate, record the command, write `--out`, print the summary."""
    plan = StepPlan.parse(args.step_plan).plan if args.step_plan else None
    bases = {k: getattr(args, k) for k in ("identity_base", "speaker_base", "content_base")}
    heldout = HeldOutSet(**bases)
    result = evaluate_checkpoint(
        args.checkpoint,
        args.clips,
        args.seconds,
        args.speech,
        plan,
        args.t_mci,
        not args.no_urcr,
        args.window_seconds,
        not args.no_references,
        heldout=heldout,
        deflicker=not args.no_deflicker,
        render=render,
        sampler=sampler,
        progress=lambda line: print(line, file=sys.stderr),
    )
    result["command"] = command
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(
        json.dumps(
            {k: result[k] for k in ("model_metrics", "vae_reconstruction", "still_portrait", "drift_passed")}, indent=2
        )
    )
    return result


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run(args, "python -m model.eval.heldout " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
