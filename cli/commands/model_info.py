"""`avatar-render model-info`: parameters per module and KV-cache bytes, built on the meta device."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameters per module and KV-cache memory of a preset")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--window", type=int, help="latent frames in the cache window (default: the preset's)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the cached keys/values",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from model.config import get_preset
    from model.dit import CausalWanDiT

    preset = get_preset(args.preset)
    if args.height or args.width:
        preset = preset.with_resolution(args.height or preset.video.height, args.width or preset.video.width)
    gen = preset.generator
    window = args.window or gen.window_frames
    with torch.device("meta"):
        dit = CausalWanDiT(preset.dit)

    groups: dict[str, int] = {}
    for name, p in dit.named_parameters():
        key = "blocks" if name.startswith("blocks.") else name.split(".")[0]
        if dit.is_conditioning_param(name):
            key = f"{key} (conditioning)"
        groups[key] = groups.get(key, 0) + p.numel()
    print(
        f"preset: {preset.name}  video {preset.video.height}x{preset.video.width} @ {preset.video.fps} fps  "
        f"latent {preset.latent_height}x{preset.latent_width}  tokens/frame {preset.tokens_per_frame}"
    )
    for key, n in groups.items():
        print(f"  {key:32s} {n:>14,d}")
    total = sum(p.numel() for p in dit.parameters())
    print(f"backbone_params: {dit.backbone_parameters()}")
    print(f"conditioning_params: {total - dit.backbone_parameters()}")
    print(f"total_params: {total}")

    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    cfg = preset.dit
    per_frame = 2 * cfg.num_layers * preset.tokens_per_frame * cfg.dim * elem  # keys + values, all layers
    block = gen.frames_per_block * per_frame
    cache = (gen.sink_frames + window) * per_frame
    print(f"kv_cache_bytes_per_frame: {per_frame}  ({args.dtype})")
    print(f"kv_cache_bytes_per_block: {block}  ({gen.frames_per_block} latent frames)")
    print(
        f"kv_cache_bytes_window: {cache}  (sink {gen.sink_frames} + window {window} latent frames, "
        f"{cache / 2**20:.1f} MiB)"
    )
    return 0
