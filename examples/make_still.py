"""The README's still (`docs/img/demo_still.png`): first, middle and last frame of three `make demo` videos.

    make demo && python examples/make_still.py

Rows are videos, columns are frames, each frame scaled up without smoothing so the model's pixels stay visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from model.media.video import read_video

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("synth-0", "synth-1", "astronaut")
SCALE = 2  # 128x128 frames shown at 256x256


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=str(ROOT / "outputs"), help="the directory `make demo` rendered into")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "demo_still.png"))
    args = parser.parse_args(argv)
    rows = []
    for name in NAMES:
        frames, _ = read_video(Path(args.videos) / f"{name}.mp4")
        picks = [frames[0], frames[len(frames) // 2], frames[-1]]
        rows.append(np.concatenate(picks, axis=1))
    grid = np.concatenate(rows, axis=0)
    image = Image.fromarray(grid).resize((grid.shape[1] * SCALE, grid.shape[0] * SCALE), Image.NEAREST)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
