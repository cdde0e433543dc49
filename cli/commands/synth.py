"""`avatar-render synth --out DIR --clips N --seconds S`: write a SynthTalk data set and its manifest."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic talking-head clips with ground truth (SynthTalk)")
    p.add_argument("--out", required=True, help="output directory (gets DIR/manifest.jsonl and one folder per clip)")
    p.add_argument("--clips", type=int, required=True, help="number of clips")
    p.add_argument("--seconds", type=float, required=True, help="length of every clip")
    p.add_argument("--seed", type=int, default=0, help="data set seed: clip i uses seed * 1000003 + i")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels (even)")
    p.add_argument(
        "--speech",
        choices=["formant", "espeak"],
        default="formant",
        help="formant-synthesised random phones, or espeak-ng speaking sentences",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.synth.world import write_dataset

    if args.clips < 1 or args.seconds <= 0:
        raise SystemExit("synth: --clips must be >= 1 and --seconds > 0")
    if args.size < 2 or args.size % 2:
        raise SystemExit(f"synth: --size must be a positive even number (H.264), got {args.size}")
    manifest = write_dataset(args.out, args.clips, args.seconds, args.seed, args.size, args.speech, progress=True)
    print(f"wrote {args.clips} clips; manifest: {manifest}")
    return 0
