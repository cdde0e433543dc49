"""`avatar-render import livetalk|omniavatar`: open weights -> one self-contained checkpoint directory.

    avatar-render import livetalk --dit LiveTalk-1.3B-V0.1/model.safetensors \\
        --wan Wan2.1-T2V-1.3B-Diffusers --wav2vec2 wav2vec2-base-960h --out checkpoints/livetalk-1.3b

docs/models.md says which repositories to fetch and what the directory holds.
"""

from __future__ import annotations

import argparse
import sys

SOURCES = {
    "livetalk": "LiveTalk-1.3B-V0.1's model.safetensors: the 4-step block-causal student (renders)",
    "omniavatar": "a LoRA-merged OmniAvatar-1.3B safetensors: the bidirectional teacher (for model/train/)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import LiveTalk / OmniAvatar weights into one checkpoint directory")
    kinds = p.add_subparsers(dest="source", required=True)
    for name, what in SOURCES.items():
        k = kinds.add_parser(name, help=what, description=what)
        k.add_argument("--dit", required=True, help=f"the {name} DiT weights (.safetensors, or a sharded index)")
        k.add_argument(
            "--wan", required=True, help="the Wan2.1-T2V-1.3B-Diffusers directory (vae/, text_encoder/, tokenizer/)"
        )
        k.add_argument(
            "--wav2vec2", required=True, help="a wav2vec2 directory in transformers' format (wav2vec2-base-960h)"
        )
        k.add_argument("--out", required=True, help="the checkpoint directory to create")
        k.add_argument("--vae", help="Wan2.1's original Wan2.1_VAE.pth instead of the Diffusers vae/")
        k.add_argument("--num-heads", type=int, help="attention heads, for a DiT whose heads are not 128 wide")
        k.add_argument("--height", type=int, help="video height (default 512, LiveTalk's)")
        k.add_argument("--width", type=int, help="video width (default 512)")
        k.add_argument("--force", action="store_true", help="replace --out if it exists")
        k.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.errors import ModelComponentError
    from model.importer import import_livetalk

    try:
        import_livetalk(
            args.dit,
            args.wan,
            args.wav2vec2,
            args.out,
            vae_pth=args.vae,
            teacher=args.source == "omniavatar",
            num_heads=args.num_heads,
            height=args.height,
            width=args.width,
            force=args.force,
        )
    except (CheckpointError, ModelComponentError, FileNotFoundError, FileExistsError) as err:
        print(f"avatar-render import {args.source}: error: {err}", file=sys.stderr)
        return 2
    return 0
