"""`avatar-render render-one`: one portrait and one speech track to one mp4, with a progress bar."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from model.config import PRESETS  # pydantic only: --help stays instant

    p = sub.add_parser("render-one", help="render one portrait + speech track to an mp4 (H.264 + AAC)")
    p.add_argument("--portrait", required=True, help="PNG, JPEG or WebP")
    p.add_argument("--audio", required=True, help="speech: wav, flac, mp3, m4a/aac, ogg/opus (any rate, mono/stereo)")
    p.add_argument("--out", required=True, help="output .mp4 (written atomically)")
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="model preset when no checkpoint is given (default: tiny)",
    )
    model.add_argument(
        "--checkpoint", help="checkpoint directory (trained here, or built by `avatar-render import`), or its s3:// URI"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="the DiT's dtype (auto: bfloat16 on a GPU, float32 on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", help="PSB step plan: steps of block 0, 1, ..., the last repeats, e.g. 8,6,4")
    p.add_argument("--prompt", help="optional text prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from model.checkpoint import CheckpointError
    from model.errors import InputError, ModelComponentError
    from model.generator import RenderSettings

    try:
        settings = RenderSettings(seed=args.seed, step_plan=args.steps)
    except ValidationError as err:
        problem = err.errors()[0]["msg"].removeprefix("Value error, ")
        print(f"avatar-render render-one: error: --steps: {problem}", file=sys.stderr)
        return 2
    try:
        return _render(args, settings)
    # The user's files and the model's: one line naming the file and the problem, never a traceback.
    except (InputError, ModelComponentError, CheckpointError, FileNotFoundError) as err:
        print(f"avatar-render render-one: error: {err}", file=sys.stderr)
        return 2


def _render(args: argparse.Namespace, settings) -> int:
    import torch
    from tqdm import tqdm

    from model.generator import AvatarModel
    from model.render import render_to_mp4

    checkpoint = args.checkpoint
    if checkpoint and checkpoint.startswith("s3://"):
        from pipeline.model_cache import local_checkpoint
        from pipeline.settings import PipelineSettings
        from pipeline.storage import ObjectStore

        checkpoint = local_checkpoint(checkpoint, ObjectStore(PipelineSettings().storage))
    dtype = getattr(
        torch, ("bfloat16" if args.device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    )
    model = AvatarModel.load(checkpoint, preset=args.preset, device=args.device, dtype=dtype)
    print(f"model: {model.description}")
    if model.description.startswith("random"):
        print(
            "note: no trained model ships yet, so a seeded random stand-in renders this video: "
            "expect moving noise, not a talking face"
        )
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="frame", desc="render", disable=args.no_progress)
        bar.update(done - bar.n)

    try:
        result = render_to_mp4(
            model, args.portrait, args.audio, args.out, settings, progress=progress, prompt=args.prompt
        )
    finally:
        if bar is not None:
            bar.close()
    wall = sum(result["timings"].values())
    print(
        f"wrote {result['out_path']}: {result['frames']} frames ({result['seconds']:.2f} s at {result['fps']} fps), "
        f"{result['blocks']} blocks in {wall:.1f} s ({result['frames'] / wall:.1f} video frames per second)"
    )
    return 0
