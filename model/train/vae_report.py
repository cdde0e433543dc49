"""How well a trained VAE reconstructs held-out SynthTalk clips, and whether that holds over a clip's length.

    python -m model.train.vae_report runs/tiny/vae/checkpoint.pt --clips 2 --seconds 8

Per clip: the mean absolute error (0-255) of every latent frame's video frames after encode -> decode of the whole clip
(a VAE whose causal state drifts shows it growing with the index), and the lip-sync and identity metrics of the
reconstruction (the ceiling for any generator using this VAE: a mouth the VAE cannot draw cannot move in sync).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from model.config import get_preset
from model.eval import score
from model.synth import load_truth_phones
from model.train.data import DataConfig, eval_clip
from model.train.vae import reconstruct_clip
from model.vae import WanVAE


def load_stage_vae(path: str, preset_name: str = "tiny") -> WanVAE:
    """The VAE of a training-stage checkpoint (`<run>/vae/checkpoint.pt`)."""
    vae = WanVAE(get_preset(preset_name).vae)
    vae.load_state_dict(torch.load(path, weights_only=True)["modules"]["vae"])
    return vae.eval()


def vae_report(vae: WanVAE, clips: int, seconds: float, data: DataConfig | None = None, size: int = 64) -> dict:
    data, stride = data or DataConfig(), vae.temporal_stride
    rows = []
    for i in range(clips):
        clip = eval_clip(data, i, seconds, size)
        recon = reconstruct_clip(vae, clip, stride)
        error = np.abs(recon.astype(np.float32) - clip.frames[: len(recon)].astype(np.float32)).mean(axis=(1, 2, 3))
        per_latent = [float(error[0])] + [float(error[1 + stride * k: 1 + stride * (k + 1)].mean())
                                          for k in range((len(error) - 1) // stride)]
        result = score(recon, clip.fps, clip.portrait, clip.audio, phones=load_truth_phones(clip.truth))
        truth = score(clip.frames[: len(recon)], clip.fps, clip.portrait, clip.audio,
                      phones=load_truth_phones(clip.truth))
        rows.append({"mae_by_latent_frame": [round(v, 1) for v in per_latent], "mae": round(float(error.mean()), 2),
                     "recon_lipsync_r": result["lipsync_r"], "truth_lipsync_r": truth["lipsync_r"],
                     "recon_identity_error": result["identity_error"], "truth_identity_error": truth["identity_error"]})
    return {"clips": rows, "mae": float(np.mean([r["mae"] for r in rows])),
            "recon_lipsync_r": float(np.mean([r["recon_lipsync_r"] for r in rows]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a VAE stage checkpoint, <run>/vae/checkpoint.pt")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    print(json.dumps(vae_report(load_stage_vae(args.checkpoint), args.clips, args.seconds), indent=1))


if __name__ == "__main__":
    main()
