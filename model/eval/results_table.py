"""Markdown rows for docs/results.md from `model.eval.heldout` JSON files, each with the command that made it.

python -m model.eval.results_table runs/tiny/eval/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: list[tuple[str, dict]]) -> str:
    lines = [
        "| row | lipsync_r | av_offset_frames | identity_error | VAE recon identity_error | ratio | "
        "boundary_jitter | latent seams inside blocks (model / VAE recon) | clips x s | command |",
        "|---" * 10 + "|",
    ]
    for name, r in results:
        m, v = r["model_metrics"], r.get("vae_reconstruction") or {}
        ratio = (m["identity_error"] / v["identity_error"]) if v.get("identity_error") else None
        lines.append(
            f"| {name} | {_fmt(m['lipsync_r'])} | {_fmt(m['av_offset_frames'], 2)} | "
            f"{_fmt(m['identity_error'], 4)} | {_fmt(v.get('identity_error'), 4)} | {_fmt(ratio, 2)} | "
            f"{_fmt(m['boundary_jitter'])} | {_fmt(m.get('latent_seam_jitter'), 2)} / "
            f"{_fmt(v.get('latent_seam_jitter'), 2)} | {r['clips']} x {r['seconds']:g} | `{r['command']}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    args = parser.parse_args(argv)
    print(table([(Path(p).stem, json.loads(Path(p).read_text())) for p in args.results]))


if __name__ == "__main__":
    main()
