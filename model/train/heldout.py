"""Evaluate a checkpoint on SynthTalk identities and speakers never seen in training (model.eval metrics).

    python -m model.train.heldout --checkpoint model/weights/tiny --clips 2 --seconds 8 \
        --out runs/tiny/eval/default.json
    python -m model.train.heldout --seconds 600 --clips 1 --no-urcr --out runs/tiny/eval/no-urcr-10min.json
    python -m model.train.heldout --checkpoint runs/tiny/teacher_model --teacher-steps 32 --clips 2 --seconds 4

Per clip it renders with the real generator (any step plan / t_mci override, URCR and the deflicker on or off),
scores the video with `model.eval.score` against the truth phones, and scores two references on the same clip: the
VAE's own reconstruction of the ground-truth frames (the floor for identity_error) and the still portrait repeated
(what "no model" would give).
The per-30-second windows of every clip are compared with its first window (`drift_check`, the drift test).
`--teacher-steps` samples a bidirectional teacher instead: independent windows of the length it was trained on, each
integrated with that many Euler steps (a teacher cannot stream, so there is no cache and no context between windows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.deflicker import deflicker_video
from model.eval import metrics, score
from model.generator import AvatarModel, RenderSettings
from model.scheduler import FlowMatchSchedule, StepPlan
from model.synth import Clip, load_truth_phones
from model.train.common import SinkDenoiser
from model.train.data import DataConfig, eval_clip
from model.train.teacher import DiTTrainConfig
from model.train.vae import reconstruct_clip
from model.vae import frames_to_tensor, tensor_to_frames

KEYS = ("lipsync_r", "av_offset_frames", "identity_error", "boundary_jitter")
ROW_KEYS = KEYS + ("latent_seam_jitter",)
DRIFT_TOLERANCE = 0.10  # a window may be at most 10% worse than the first (the drift target)


def render_clip(model: AvatarModel, clip: Clip, settings: RenderSettings) -> np.ndarray:
    """A clip's whole video, uint8 (N, H, W, 3), rendered by the real generator from its portrait and audio."""
    session = model.open(clip.portrait, None, settings)
    session.feed_audio(clip.audio, final=True)
    return np.concatenate([b.frames for b in session])


def latent_seam_jitter(
    frames: np.ndarray, temporal_stride: int, first_block_frames: int, block_frames: int
) -> float | None:
    """`boundary_jitter` measured at the latent-frame boundaries *inside* the generator's blocks.

    Every block boundary is also a boundary between two latent frames' video frames, so the block seams include the
    VAE's own seams. These boundaries have only the VAE's: next to `boundary_jitter` they tell the two apart.
    """
    latent_starts = np.arange(1 + temporal_stride, len(frames), temporal_stride)  # frame 1 + s*k starts latent k+1
    inside = np.setdiff1d(latent_starts, metrics.block_boundaries(len(frames), block_frames, first_block_frames))
    return metrics.boundary_jitter(metrics.frame_changes(frames), inside)


def _metrics(result: dict, frames: np.ndarray, temporal_stride: int, layout: dict) -> dict:
    return {**{k: result[k] for k in KEYS}, "latent_seam_jitter": latent_seam_jitter(frames, temporal_stride, **layout)}


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


@torch.no_grad()
def sample_teacher(
    model: AvatarModel, clip: Clip, steps: int, window_frames: int, seed: int, deflicker: bool = True
) -> np.ndarray:
    """A bidirectional teacher's video: independent windows of `window_frames` latent frames after the sink, each at
    the positions the teacher was trained on, integrated with `steps` Euler steps; decoded as one clip (then the
    preset's deflicker, as the generator would apply it)."""
    preset, dit = model.preset, model.dit
    stride = preset.vae.temporal_stride
    total = 1 + (len(clip.frames) - 1) // stride  # latent frames of the clip
    reference = model.vae.encode(frames_to_tensor(clip.portrait[None]))
    audio = model.featurizer.block_features(clip.audio, 0, total, stride)[None]
    denoiser = SinkDenoiser(dit, preset.text.max_length)
    schedule = FlowMatchSchedule(preset.generator.shift, preset.generator.num_train_timesteps)
    sigmas = schedule.sigmas(steps).tolist()
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, total, window_frames):
        n = min(window_frames, total - start)
        x = torch.randn(
            1, preset.dit.latent_channels, n, preset.latent_height, preset.latent_width, generator=generator
        )
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = schedule.timestep(torch.full((1, n), sigma))
            x = x + (sigma_next - sigma) * denoiser(
                x, t, reference, audio[:, start : start + n], preset.generator.sink_frames
            )
        latents.append(x)
    video = model.vae.decode(torch.cat(latents, dim=2)).clamp(-1.0, 1.0)
    if deflicker:
        video = deflicker_video(video, stride, preset.generator.deflicker)
    return tensor_to_frames(video)


def evaluate_checkpoint(
    checkpoint: str | None,
    clips: int,
    seconds: float,
    speech: str = "formant",
    step_plan: tuple[int, ...] | None = None,
    t_mci: float | None = None,
    urcr: bool = True,
    teacher_steps: int | None = None,
    window_seconds: float = 30.0,
    references: bool = True,
    data: DataConfig | None = None,
    deflicker: bool = True,
    progress=print,
) -> dict:
    data = data or DataConfig()
    model = AvatarModel.load(checkpoint)
    size = model.preset.video.height
    stride = model.preset.vae.temporal_stride
    layout = metrics.block_layout(stride, model.preset.generator.frames_per_block)
    rendered, vae_rows, still_rows, windows, checks, startup, seconds_taken = [], [], [], [], [], [], 0.0
    for i in range(clips):
        clip = eval_clip(data, i, seconds, size, speech)
        phones = load_truth_phones(clip.truth)
        started = time.monotonic()
        if teacher_steps:
            window = DiTTrainConfig().window_blocks * model.preset.generator.frames_per_block  # its training window
            frames = sample_teacher(model, clip, teacher_steps, window, seed=i, deflicker=deflicker)
        else:
            settings = RenderSettings(seed=i, step_plan=step_plan, t_mci=t_mci, urcr=urcr, deflicker=deflicker)
            frames = render_clip(model, clip, settings)
        seconds_taken += time.monotonic() - started
        result = score(
            frames, clip.fps, clip.portrait, clip.audio, phones=phones, window_seconds=window_seconds, **layout
        )
        rendered.append(_metrics(result, frames, stride, layout))
        windows.append(result["windows"])
        checks.append(drift_check(result["windows"]))
        if references:
            recon = reconstruct_clip(model.vae, clip, stride)
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
        "clips": clips,
        "seconds": seconds,
        "speech": speech,
        "sampler": f"teacher, {teacher_steps} Euler steps" if teacher_steps else "generator",
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=None,
        help="the checkpoint is a bidirectional teacher: sample it with this many Euler steps",
    )
    parser.add_argument("--window-seconds", type=float, default=30.0, help="drift windows")
    parser.add_argument("--no-references", action="store_true", help="skip the VAE-reconstruction and still rows")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    plan = StepPlan.parse(args.step_plan).plan if args.step_plan else None
    result = evaluate_checkpoint(
        args.checkpoint,
        args.clips,
        args.seconds,
        args.speech,
        plan,
        args.t_mci,
        not args.no_urcr,
        args.teacher_steps,
        args.window_seconds,
        not args.no_references,
        deflicker=not args.no_deflicker,
        progress=lambda line: print(line, file=sys.stderr),
    )
    result["command"] = "python -m model.train.heldout " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(
        json.dumps(
            {k: result[k] for k in ("model_metrics", "vae_reconstruction", "still_portrait", "drift_passed")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
