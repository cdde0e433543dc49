"""How well a trained VAE reconstructs held-out SynthTalk clips, and whether that holds over a clip's length.

    python -m model.eval.vae_report runs/tiny/vae/checkpoint.pt --clips 2 --seconds 8

Per clip: the mean absolute error (0-255) of every latent frame's video frames after encode -> decode of the whole clip
(a VAE whose causal state drifts shows it growing with the index), and the lip-sync, identity and boundary-jitter
metrics of the reconstruction (the ceiling for any generator using this VAE: a mouth the VAE cannot draw cannot move
in sync). `change_by_pair_position` locates the seams: the mean frame-to-frame change (0-255) of the reconstruction and
of the truth for the pairs that cross from one latent frame's video frames to the next (position 0) and for the pairs
inside them (1 .. stride - 1). PSNR against the truth of the reconstruction and of the still portrait (the honest
baseline, printed beside it), over the clip and at frame 0.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from model.config import get_preset
from model.eval import metrics, score
from model.eval.heldout import HELD_OUT, VALIDATION, reconstruct_clip, truth_psnr
from model.synth import Clip, load_truth_phones
from model.vae import WanVAE


def load_stage_vae(path: str, preset_name: str = "tiny") -> WanVAE:
    """The VAE of a training-stage checkpoint (`<run>/vae/checkpoint.pt`)."""
    vae = WanVAE(get_preset(preset_name).vae)
    vae.load_state_dict(torch.load(path, weights_only=True)["modules"]["vae"])
    return vae.eval()


def vae_report(vae: WanVAE, clips: list[Clip]) -> dict:
    """The report over these clips (the command line's: held-out clips; the recipe's gate: validation clips)."""
    stride = vae.temporal_stride
    rows = []
    for clip in clips:
        recon = reconstruct_clip(vae, clip)
        truth_frames = clip.frames[: len(recon)]
        error = np.abs(recon.astype(np.float32) - truth_frames.astype(np.float32)).mean(axis=(1, 2, 3))
        per_latent = [float(error[0])] + [
            float(error[1 + stride * k : 1 + stride * (k + 1)].mean()) for k in range((len(error) - 1) // stride)
        ]
        recon_errors = metrics.squared_errors(recon, truth_frames)
        still = truth_psnr(clip.portrait, truth_frames)  # not animating at all: the baseline
        phones = load_truth_phones(clip.truth)
        result = score(recon, clip.fps, clip.portrait, clip.audio, phones=phones)
        truth = score(truth_frames, clip.fps, clip.portrait, clip.audio, phones=phones)
        # Pair i joins frames i and i + 1; frame 1 + stride * k starts latent frame k + 1, so i % stride == 0 crosses.
        changes = {name: metrics.frame_changes(v) * 255.0 for name, v in (("recon", recon), ("truth", truth_frames))}
        rows.append(
            {
                "mae_by_latent_frame": [round(v, 1) for v in per_latent],
                "mae": round(float(error.mean()), 2),
                # A generator on this VAE cannot beat its reconstruction: it must leave room above the still's PSNR.
                "recon_psnr": metrics.psnr(recon_errors.mean()),
                "still_psnr": still["truth_psnr"],
                "recon_psnr_frame0": metrics.psnr(recon_errors[0]),
                "still_psnr_frame0": still["truth_psnr_frame0"],
                "change_by_pair_position": {
                    name: [round(float(c[k::stride].mean()), 3) for k in range(stride)] for name, c in changes.items()
                },
                "recon_lipsync_r": result["lipsync_r"],
                "truth_lipsync_r": truth["lipsync_r"],
                "recon_identity_error": result["identity_error"],
                "truth_identity_error": truth["identity_error"],
                "recon_boundary_jitter": result["boundary_jitter"],
                "truth_boundary_jitter": truth["boundary_jitter"],
            }
        )
    return {
        "clips": rows,
        **{
            key: float(np.mean([r[key] for r in rows]))
            for key in ("mae", "recon_psnr", "still_psnr", "recon_lipsync_r", "recon_boundary_jitter")
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a VAE stage checkpoint, <run>/vae/checkpoint.pt")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--split",
        choices=["heldout", "validation"],
        default="heldout",
        help="held-out clips report a VAE; validation clips are the ones to compare training choices on",
    )
    args = parser.parse_args(argv)
    size = get_preset(args.preset).video.height
    split = HELD_OUT if args.split == "heldout" else VALIDATION
    clips = [split.clip(i, args.seconds, size) for i in range(args.clips)]
    print(json.dumps(vae_report(load_stage_vae(args.checkpoint, args.preset), clips), indent=1))


if __name__ == "__main__":
    main()
