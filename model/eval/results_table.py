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


def _pair(a, b, digits: int = 2) -> str:
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


def table(results: list[tuple[str, dict]]) -> str:
    """One row per result: the render's metrics; PSNR against the truth next to the still portrait's (the baseline),
    the steady truth's (the truth without its head sway: the ceiling of a render that holds the head still) and the
    VAE reconstruction's, over the clip and at frame 0."""
    lines = [
        "| row | lipsync_r | av_offset_frames | PSNR vs truth, dB: render / still / steady truth / VAE recon | "
        "frame 0: render / "
        "still | portrait_psnr | identity_error | boundary_jitter | latent seams (model / VAE recon) | clips x s | "
        "command |",
        "|---" * 11 + "|",
    ]
    for name, r in results:
        m, v, s = r["model_metrics"], r.get("vae_reconstruction") or {}, r.get("still_portrait") or {}
        c = r.get("steady_truth") or {}
        lines.append(
            f"| {name} | {_fmt(m['lipsync_r'])} | {_fmt(m['av_offset_frames'], 2)} | "
            f"{_fmt(m.get('truth_psnr'), 2)} / {_fmt(s.get('truth_psnr'), 2)} / {_fmt(c.get('truth_psnr'), 2)} / "
            f"{_fmt(v.get('truth_psnr'), 2)} | "
            f"{_pair(m.get('truth_psnr_frame0'), s.get('truth_psnr_frame0'))} | {_fmt(m.get('portrait_psnr'), 2)} | "
            f"{_fmt(m['identity_error'], 4)} | {_fmt(m['boundary_jitter'])} | "
            f"{_pair(m.get('latent_seam_jitter'), v.get('latent_seam_jitter'))} | {r['clips']} x {r['seconds']:g} | "
            f"`{r['command']}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    args = parser.parse_args(argv)
    print(table([(Path(p).stem, json.loads(Path(p).read_text())) for p in args.results]))


if __name__ == "__main__":
    main()
