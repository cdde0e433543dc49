"""Choose the paste-back threshold (`generator.paste_back.threshold`) of a trained model, on validation clips.

    python -m model.train.calibrate_paste_back --checkpoint model/weights/tiny --clips 4 --seconds 12

The paste-back (model/paste_back.py) returns the portrait's own pixels wherever a decoded frame is within the
threshold of the decoded portrait. Too low a threshold leaves the VAE's loss (and the generator's blur) on pixels that
never moved; too high a one pastes the still portrait over real motion (the mouth). The measure is the PSNR against
the steady truth (the clip's ground truth without its idle head sway, `model.eval.heldout`) minus the still
portrait's, averaged over the clips; the best threshold is chosen. Not against the swaying truth: no render can know
the sway, and there the blur a low threshold leaves hedges over it and scores, so that measure would choose a blurrier
render than the one that is closest to what the face did. Both margins are reported. Each clip is rendered once
without the paste-back and every threshold applied to its decoded frames, exactly as a render applies it.
Clips come from the validation set: the held-out set, which judges the result, is not used to choose it.
"""

from __future__ import annotations

import numpy as np
import torch

from model.config import PasteBackConfig
from model.eval import metrics
from model.eval.heldout import STEADY_KEY, VALIDATION, truth_psnr
from model.generator import AvatarModel, RenderSettings
from model.paste_back import PasteBack
from model.train.calibrate_deflicker import threshold_cli
from model.vae import StreamingDecoder, frames_to_tensor, tensor_to_frames

THRESHOLDS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)  # grey levels: from below the VAE's error to everywhere


def margins(frames: np.ndarray, truth: np.ndarray, steady: np.ndarray, still: dict) -> dict:
    """PSNR minus the still portrait's (`still`: its `truth_psnr` row, the same for every threshold), against the
    steady truth (the measure) and against the truth, over the clip, and at frame 0."""
    row = truth_psnr(frames, truth, steady)
    return {
        "steady_over_still_db": row[STEADY_KEY] - still[STEADY_KEY],
        "over_still_db": row["truth_psnr"] - still["truth_psnr"],
        "frame0_over_still_db": row["truth_psnr_frame0"] - still["truth_psnr_frame0"],
    }


def summary(rows: list[dict]) -> dict:
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return means | {f"per_clip_{k}": [r[k] for r in rows] for k in ("steady_over_still_db", "over_still_db")}


@torch.no_grad()
def decoded_render(model: AvatarModel, clip, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A clip's render as the decoder gives it, (1, 3, N, H, W) in [-1, 1] before any paste-back, with the portrait
    and its decode as a session pastes them (on the model's device, from the latent in the model's dtype): the same
    blocks as `render_clip` (the session's own passes), decoded on one stream, so every threshold is applied to the
    very values a render would apply it to (rounded frames would shift the gate by up to half a grey level)."""
    session = model.open(clip.portrait, None, RenderSettings(seed=seed, paste_back=False))
    session.feed_audio(clip.audio, final=True)
    decoder = StreamingDecoder(model.vae, model.preset.generator.deflicker)
    blocks = []
    while not session.finished:
        blocks.append(decoder.decode_block(session.next_latents().float()))
    video = torch.cat(blocks, dim=2)[:, :, : session.total_frames]
    portrait = frames_to_tensor(clip.portrait[None]).to(model.device)
    return video, portrait, StreamingDecoder(model.vae).decode_block(session.reference.float())


@torch.no_grad()
def calibrate(model: AvatarModel, thresholds: list[float], clips: int, seconds: float, progress=print) -> dict:
    """Render `clips` validation clips of `seconds`; returns each threshold's margins over the still and the choice
    (0.0, off, unless a threshold beats the render without the paste-back)."""
    size = model.preset.video.height
    rows: dict[float, list[dict]] = {t: [] for t in thresholds}
    portrait_decode_psnr = []
    for i in range(clips):
        clip = VALIDATION.clip(i, seconds, size)
        video, portrait, decoded = decoded_render(model, clip, seed=i)
        truth = clip.frames[: video.shape[2]]
        steady = VALIDATION.clip(i, seconds, size, head_motion=0.0).frames[: video.shape[2]]
        still = truth_psnr(clip.portrait, truth, steady)
        decode_error = metrics.squared_errors(tensor_to_frames(decoded[0]), clip.portrait)[0]
        portrait_decode_psnr.append(metrics.psnr(decode_error))  # the VAE's own loss on the portrait
        for threshold in thresholds:
            pasted = tensor_to_frames(PasteBack(portrait, decoded, PasteBackConfig(threshold=threshold))(video)[0])
            rows[threshold].append(margins(pasted, truth, steady, still))
        rows.setdefault(0.0, []).append(margins(tensor_to_frames(video[0]), truth, steady, still))
        off = rows[0.0][-1]["steady_over_still_db"]
        progress(f"clip {i}: without paste-back {off:+.2f} dB over the still against the steady truth")
    table = {t: summary(rs) for t, rs in sorted(rows.items())}  # 0.0: without the paste-back
    best = max([0.0, *thresholds], key=lambda t: table[t]["steady_over_still_db"])
    return {
        "heldout": VALIDATION.model_dump(),
        "clips": clips,
        "seconds": seconds,
        "portrait_decode_psnr": portrait_decode_psnr,
        "by_threshold": table,
        "chosen_threshold": best,
    }


def main(argv: list[str] | None = None) -> None:
    threshold_cli(__doc__.splitlines()[0], calibrate, THRESHOLDS, clips=4, seconds=12.0, argv=argv)


if __name__ == "__main__":
    main()
