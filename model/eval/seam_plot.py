"""Plot the frame-to-frame change of a held-out render with and without the deflicker, against the truth.

    python -m model.eval.seam_plot --checkpoint model/weights/tiny --clip 0 --seconds 2 --out docs/img/seams.png

One line per video: the mean absolute change (0-255) between consecutive frames. Thin grey lines mark latent-frame
crossings, thick ones block boundaries; a seam is a spike on a crossing. Points above the scale are clipped to its
top and labelled with their values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from model.eval import metrics
from model.eval.heldout import HELD_OUT, render_clip
from model.generator import AvatarModel, RenderSettings


def plot_seams(model: AvatarModel, clip_index: int, seconds: float, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preset = model.preset
    clip = HELD_OUT.clip(clip_index, seconds, preset.video.height)
    videos = {
        "truth": clip.frames,  # seeds as in model.eval.heldout: the same renders as its rows
        "render, deflicker off": render_clip(model, clip, RenderSettings(seed=clip_index, deflicker=False)),
        "render (default: deflicker on)": render_clip(model, clip, RenderSettings(seed=clip_index)),
    }
    stride = preset.vae.temporal_stride
    layout = metrics.block_layout(stride, preset.generator.frames_per_block)
    n = min(len(v) for v in videos.values())
    fig, ax = plt.subplots(figsize=(9, 3.2))
    # The change from frame i - 1 to frame i is drawn at x = i, so a crossing into frame `start` sits on its line.
    for start in range(1, n, stride):
        ax.axvline(start, color="0.85", lw=0.6)
    for b in metrics.block_boundaries(n, layout["block_frames"], layout["first_block_frames"]):
        ax.axvline(b, color="0.55", lw=1.2)
    changes = {label: metrics.frame_changes(frames[:n]) * 255.0 for label, frames in videos.items()}
    # The scale of the seams: the first block's start (frame 0 is decoded alone) can jump far more; those points are
    # clipped to the top and labelled with their values.
    top = 1.5 * max(c[layout["first_block_frames"] :].max() for c in changes.values())
    for k, (label, c) in enumerate(changes.items()):
        (line,) = ax.plot(np.arange(1, n), np.minimum(c, top), marker="o", ms=2.5, lw=1, label=label)
        for i in np.nonzero(c > top)[0]:
            ax.annotate(
                f"{c[i]:.0f}",
                (i + 1, top),
                textcoords="offset points",
                xytext=(4, -10 - 9 * k),
                fontsize=7,
                color=line.get_color(),
            )
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("frame i (change from frame i - 1; grey lines: latent-frame crossings, dark: block boundaries)")
    ax.set_ylabel("mean |change| from the frame before (0-255)", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.2, axis="y")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: the bundled model)")
    parser.add_argument("--clip", type=int, default=0, help="held-out clip index")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    plot_seams(AvatarModel.load(args.checkpoint), args.clip, args.seconds, args.out)


if __name__ == "__main__":
    main()
