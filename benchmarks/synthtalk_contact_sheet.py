"""Contact sheet of SynthTalk: identities (top rows) and the mouth shapes of phones (bottom rows).

python benchmarks/synthtalk_contact_sheet.py --out docs/img/synthtalk_contact_sheet.png
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from model.synth.face import Identity, render, render_portrait
from model.synth.phones import PHONES

MOUTH_PHONES = ("_", "a", "ae", "e", "i", "o", "u", "s", "sh", "m")


def contact_sheet(tile: int, identities: int, columns: int, mouth_rows: int) -> Image.Image:
    portraits = [render_portrait(Identity.from_seed(seed), tile) for seed in range(identities)]
    rows = [np.concatenate(portraits[i : i + columns], axis=1) for i in range(0, identities, columns)]
    labels = []
    for seed in range(mouth_rows):
        identity = Identity.from_seed(100 + seed)
        mouth = np.array([[PHONES[p].opening, PHONES[p].width, PHONES[p].rounding] for p in MOUTH_PHONES], np.float32)
        pose = np.tile(np.array([0, 0, 0, 1], np.float32), (len(MOUTH_PHONES), 1))
        frames = render(identity, pose, mouth, np.zeros(len(MOUTH_PHONES), np.float32), tile)
        strip = np.concatenate(list(frames), axis=1)
        pad = np.full((tile, max(0, columns - len(MOUTH_PHONES)) * tile, 3), 255, np.uint8)
        rows.append(np.concatenate([strip, pad], axis=1)[:, : columns * tile])
        labels.append(len(rows) - 1)
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    draw = ImageDraw.Draw(sheet)
    for row in labels[:1]:
        for j, phone in enumerate(MOUTH_PHONES):
            draw.text((j * tile + 3, row * tile + 2), "rest" if phone == "_" else phone, fill=(255, 255, 255))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img/synthtalk_contact_sheet.png")
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--columns", type=int, default=10)
    parser.add_argument("--mouth-rows", type=int, default=2)
    args = parser.parse_args()
    contact_sheet(args.tile, args.identities, args.columns, args.mouth_rows).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
