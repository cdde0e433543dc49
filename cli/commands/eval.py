"""`avatar-render eval VIDEO --portrait P --audio A [--truth T] [--truth-video V] [--preset P] [--json]`: quality
metrics of a rendered video (block seams where the preset's blocks end)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="lip-sync, A/V offset, identity, block-seam jitter and drift of a video")
    p.add_argument("video", help="the rendered video (mp4)")
    p.add_argument("--portrait", required=True, help="the portrait it was rendered from")
    p.add_argument("--audio", required=True, help="the speech it was rendered from")
    p.add_argument("--truth", help="SynthTalk truth.json: lip-sync against its phones instead of the audio envelope")
    p.add_argument(
        "--truth-video",
        help="a ground-truth video of the same speech: PSNR against it, next to the still portrait's (the baseline)",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        help="the model preset that rendered it: its block layout places the seams (default: the bundled tiny)",
    )
    p.add_argument("--block-frames", type=int, help="video frames per generated block after the first (the preset's)")
    p.add_argument("--first-block-frames", type=int, help="video frames of the first block (the preset's)")
    p.add_argument(
        "--mouth",
        choices=["auto", "synth", "facemesh"],
        default="auto",
        help="how to read the mouth: SynthTalk pixels or the mediapipe face mesh (auto picks)",
    )
    p.add_argument("--window-seconds", type=float, default=30.0, help="window of the per-window (drift) metrics")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding every number")
    p.set_defaults(func=run)


def _fmt(value) -> str:
    return "n/a" if value is None else (f"{value:+.4f}" if isinstance(value, float) else str(value))


def run(args: argparse.Namespace) -> int:
    from model.config import get_preset
    from model.errors import InputError
    from model.eval.evaluate import METRICS, evaluate, truth_psnr_line
    from model.eval.metrics import block_layout

    try:
        preset = get_preset(args.preset)
    except (KeyError, ValueError) as err:
        raise SystemExit(f"eval: {err}") from None
    layout = block_layout(preset.vae.temporal_stride, preset.generator.frames_per_block)
    try:
        result = evaluate(
            args.video,
            args.portrait,
            args.audio,
            args.truth,
            args.block_frames or layout["block_frames"],
            args.first_block_frames or layout["first_block_frames"],
            args.mouth,
            args.window_seconds,
            truth_video_path=args.truth_video,
        )
    except InputError as err:
        raise SystemExit(f"eval: {err}") from None
    print(
        f"{args.video}: {result['frames']} frames at {result['fps']:g} fps, mouth read by {result['mouth_method']}, "
        f"lip-sync reference: {result['lipsync_reference']}"
    )
    for name in METRICS:
        print(f"  {name:18s} {_fmt(result[name]):>10s}   drift {_fmt(result['drift'][name + '_per_min'])}/min")
    if "truth_psnr" in result:
        print(f"  {truth_psnr_line(result)}")
    if len(result["windows"]) > 1:
        for w in result["windows"]:
            print(
                f"  window {w['start_s']:7.1f}-{w['end_s']:7.1f}s  " + "  ".join(f"{n}={_fmt(w[n])}" for n in METRICS)
            )
    if args.json:
        print(json.dumps(result))
    return 0
