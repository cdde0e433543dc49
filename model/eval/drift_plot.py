"""Plot each metric per window over a long render, one line per evaluation (e.g. URCR on and off).

    python -m model.eval.drift_plot runs/tiny/eval/urcr-10min.json runs/tiny/eval/no-urcr-10min.json \
        --label "URCR on" --label "URCR off" --out docs/img/drift_urcr.png

Inputs are `model.eval.heldout` JSON files; the first clip of each is plotted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.eval.heldout import DRIFT_TOLERANCE, KEYS


def plot_drift(results: list[dict], labels: list[str], out: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(KEYS), 1, figsize=(7, 2.1 * len(KEYS)), sharex=True)
    for result, label in zip(results, labels):
        windows = result["windows"][0]
        minutes = [(w["start_s"] + w["end_s"]) / 120.0 for w in windows]
        for ax, key in zip(axes, KEYS):
            (line,) = ax.plot(
                minutes,
                [w[key] if w[key] is not None else float("nan") for w in windows],
                marker="o",
                ms=3,
                lw=1,
                label=label,
            )
            first = windows[0][key]
            if first is not None and key != "av_offset_frames":
                sign = -1 if key == "lipsync_r" else 1  # the direction in which the metric gets worse
                ax.axhline(first + sign * DRIFT_TOLERANCE * abs(first), color=line.get_color(), ls=":", lw=0.8)
    for ax, key in zip(axes, KEYS):
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("minutes into the render (window centres; dotted: 10% worse than the first window)")
    fig.suptitle(title or "metrics per 30-second window")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="model.eval.heldout JSON files")
    parser.add_argument("--label", action="append", default=None, help="one per result (default: file names)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    labels = args.label or [Path(p).stem for p in args.results]
    if len(labels) != len(args.results):
        parser.error(f"{len(args.results)} results but {len(labels)} labels")
    plot_drift([json.loads(Path(p).read_text()) for p in args.results], labels, args.out, args.title)
    print(args.out)


if __name__ == "__main__":
    main()
