"""Evaluate a checkpoint on SynthTalk identities and speakers never seen in training (model.eval metrics).

    python -m model.eval.heldout --checkpoint model/weights/tiny --clips 2 --seconds 8 \
        --out runs/tiny/eval/default.json
    python -m model.eval.heldout --seconds 600 --clips 1 --no-urcr --out runs/tiny/eval/no-urcr-10min.json

Per clip it renders with the real generator (any step plan / t_mci override; URCR, the deflicker and the paste-back on
or off), scores the video with `model.eval.score` against the truth phones, and scores two references on the same
clip: the VAE's own reconstruction of the ground-truth frames (the floor for identity_error) and the still portrait
repeated (what "no model" would give).
Beside them it puts the ceiling of that comparison: the clip's truth re-rendered without its idle head sway (same
mouth, same blinks; `steady_truth`). The sway is drawn independently of the audio and the portrait, so no render can
know it; a render that holds the head still is at best that steady truth, and its margin over the still is, in
effect, the most any sharp render can gain against the swaying truth (beyond it, blur that hedges over the sway is
what raises the PSNR; not a proven bound: another mouth could happen to fit the swayed frames better).
Every row also gets `steady_psnr`, its PSNR against the steady truth: what the model itself controls.
Every clip's portrait is also encoded and decoded alone (`portrait_reconstruction`, over the picture and inside the
mouth box): what the VAE can draw of that face at all. A real photo (`--photo`) can be shown fitted as a portrait or
cropped to its face at SynthTalk's framing (`--photo-framing face`).
The per-30-second windows of every clip are compared with its first window (`drift_check`, the drift test).
The held-out clips are `HeldOutSet`'s: faces, voices and content seeds that training never draws from.
A bidirectional teacher is evaluated the same way through `python -m model.train.teacher` (its own sampler).

Evaluation imports nothing from `model.train`: training may use it (the recipe's gate and calibration), not the
other way round.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from model.config import parse_step_plan
from model.eval import metrics, score
from model.generator import AvatarModel, RenderSettings
from model.synth import Clip, load_truth_phones, make_clip
from model.vae import WanVAE, frames_to_tensor, tensor_to_frames

KEYS = ("lipsync_r", "av_offset_frames", "identity_error", "portrait_psnr", "boundary_jitter")
TRUTH_KEYS = ("truth_psnr", "truth_psnr_frame0")  # against the ground-truth video, where the clip has one
STEADY_KEY = "steady_psnr"  # against the ground truth without its idle head sway
ROW_KEYS = KEYS + ("latent_seam_jitter",) + TRUTH_KEYS + (STEADY_KEY,)
DRIFT_KEYS = KEYS + ("truth_psnr",)  # per window
HIGHER_IS_BETTER = ("lipsync_r", "portrait_psnr", "truth_psnr", "truth_psnr_frame0")
DECIBEL_KEYS = ("portrait_psnr", "truth_psnr", "truth_psnr_frame0")
DRIFT_TOLERANCE = 0.10  # a window may be at most 10% worse than the first (the drift target)
# The 128x128 model's targets on every held-out clip (docs/results.md): lip-sync, offset, and the render against the
# still portrait, both scored against the ground-truth video (dB): the clip's PSNR above the still's by this much,
# frame 0's no further below it than this.
TARGET_LIPSYNC_R = 0.8
TARGET_MAX_ABS_OFFSET = 1
TARGET_PSNR_MARGIN_DB = 0.5
TARGET_FRAME0_MARGIN_DB = -1.0
TARGET_PHOTO_PSNR_DB = 24.0  # a real photo against its own portrait, outside the mouth

# render(model, clip, clip_index) -> uint8 frames (N, H, W, 3)
Render = Callable[[AvatarModel, Clip, int], np.ndarray]


class HeldOutSet(BaseModel):
    """Clips training never draws from: clip i has identity `identity_base + i`, speaker `speaker_base + i` and
    content seed `content_base + i`, far from every seed of the training clips (`model.train.data.DataConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity_base: int = 300_000
    speaker_base: int = 350_000
    content_base: int = 30_000_000

    def clip(
        self,
        index: int,
        seconds: float,
        size: int,
        speech: str = "formant",
        head_motion: float = 1.0,
        with_frames: bool = True,
    ) -> Clip:
        """Clip `index`; `head_motion` 0 gives the same clip with the head held still (the steady truth);
        `with_frames=False` holds no frames (`Clip.chunks` renders them a chunk at a time)."""
        return make_clip(
            self.content_base + index,
            seconds,
            size,
            speech=speech,
            identity_seed=self.identity_base + index,
            speaker_seed=self.speaker_base + index,
            head_motion=head_motion,
            with_frames=with_frames,
        )


# The held-out clips judge a trained model and choose nothing; chosen once, before the 128x128 model was evaluated.
HELD_OUT = HeldOutSet()
# Validation clips (the 64x64 model's former held-out set) are for every choice made while training: the recipe's
# VAE gate, trials of a loss or a schedule.
VALIDATION = HeldOutSet(identity_base=90_000, speaker_base=95_000, content_base=10_000_000)


PhotoFraming = Literal["fit", "face"]
FACE_REFERENCE_PORTRAITS = 16  # validation faces that say where SynthTalk puts a face


@functools.cache  # 16 portraits rendered and meshed: once per size
def synth_face_place(size: int, identities: int = FACE_REFERENCE_PORTRAITS) -> tuple[float, float, float]:
    """Where SynthTalk's default framing puts a face, as the face mesh sees it: the mean face-oval centre (x, y) and
    height over the first validation identities' portraits, as fractions of the frame's side."""
    from model.eval.facemesh import face_oval_box
    from model.synth.face import Identity, render_portrait

    first = VALIDATION.identity_base
    boxes = [face_oval_box(render_portrait(Identity.from_seed(first + i), size)) for i in range(identities)]
    return tuple(float(v) / size for v in np.mean(boxes, axis=0))


def face_framed_photo(path: str, size: int) -> np.ndarray:
    """A photo cropped square around its face (face mesh) so the face sits where SynthTalk's default framing puts one,
    at the same size, then resized to `size`: a photo shot from further away shown to the model at the scale it was
    trained on. The crop is shifted to stay inside the photo, and shrunk to it when the face would need more."""
    from PIL import Image

    from model.eval.facemesh import face_oval_box
    from model.media.image import load_image

    image = load_image(path)
    photo = np.asarray(image)
    x, y, height = face_oval_box(photo, path)
    place_x, place_y, place_height = synth_face_place(size)
    side = max(1, min(round(height / place_height), *photo.shape[:2]))  # whole pixels: the crop is square
    left = min(max(round(x - place_x * side), 0), photo.shape[1] - side)
    top = min(max(round(y - place_y * side), 0), photo.shape[0] - side)
    crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(crop, dtype=np.uint8).copy()


def render_clip(model: AvatarModel, clip: Clip, settings: RenderSettings) -> np.ndarray:
    """A clip's whole video, uint8 (N, H, W, 3), rendered by the real generator from its portrait and audio (written
    block by block into one array: a long render is held once, not also as its list of blocks)."""
    session = model.open(clip.portrait, None, settings)
    session.feed_audio(clip.audio, final=True)
    frames = np.empty((session.total_frames, *clip.portrait.shape), dtype=np.uint8)
    done = 0
    for block in session:
        frames[done : done + len(block.frames)] = block.frames
        done += len(block.frames)
    return frames[:done]


def psnr_columns(truth_errors: np.ndarray, steady_errors: np.ndarray | None = None) -> dict:
    """PSNR against the truth over the frames compared and at frame 0, from per-frame squared errors, and with the
    steady truth's errors the PSNR against that."""
    row = {"truth_psnr": metrics.psnr(truth_errors.mean()), "truth_psnr_frame0": metrics.psnr(truth_errors[0])}
    if steady_errors is not None:
        row[STEADY_KEY] = metrics.psnr(steady_errors.mean())
    return row


def _metrics(
    result: dict,
    frames: np.ndarray,
    temporal_stride: int,
    layout: dict,
    truth_errors: np.ndarray | None = None,
    steady_errors: np.ndarray | None = None,
) -> dict:
    """A clip's row: `score`'s metrics, the seams inside blocks, and from the per-frame squared errors against the
    ground truth (`compare_with_truth`) the PSNR over the clip and at frame 0; `score`'s windows get their truth PSNR
    too (for the drift check). With the errors against the steady truth, the PSNR against that as well."""
    row = {
        **{k: result[k] for k in KEYS},
        "latent_seam_jitter": metrics.latent_seam_jitter(frames, temporal_stride, **layout),
    }
    if truth_errors is not None:
        row |= psnr_columns(truth_errors, steady_errors)
        for window in result["windows"]:
            span = truth_errors[window["start_frame"] : window["end_frame"]]
            window["truth_psnr"] = metrics.psnr(span.mean()) if len(span) else None
    return row


def truth_psnr(frames: np.ndarray, truth: np.ndarray, steady: np.ndarray | None = None) -> dict:
    """PSNR of `frames` (or one image, broadcast over the clip) against the truth, over the clip and at frame 0, and
    with `steady` against the truth without its head sway: the rows of references that `score` has no use for."""
    steady_errors = None if steady is None else metrics.squared_errors(steady, frames)
    return psnr_columns(metrics.squared_errors(truth, frames), steady_errors)


def compare_with_truth(
    truth: Clip, steady: Clip, num_frames: int, videos: dict[str, np.ndarray], absolute: tuple[str, ...] = ()
) -> dict:
    """Per-frame errors (0-255 units) over the first `num_frames` frames, the truth and the steady truth streamed in
    step a chunk at a time (`Clip.chunks`: neither need be held): for each video (frames, or an image shown in every
    frame; one shorter than `num_frames` over its own frames) the squared errors against the truth ("truth") and
    against the steady truth ("steady"), for the videos named in `absolute` the mean absolute errors against the
    truth ("truth_abs"); and the steady truth's squared errors against the truth ("truth", "steady truth")."""
    parts: dict[str, dict[str, list]] = {"truth": {}, "steady": {}, "truth_abs": {}}
    start = 0
    for true, still_head in zip(truth.chunks(), steady.chunks()):
        true, still_head = true[: num_frames - start], still_head[: num_frames - start]
        if not len(true):
            break
        parts["truth"].setdefault("steady truth", []).append(metrics.squared_errors(true, still_head))
        for name, video in videos.items():
            span = video if video.ndim == 3 else video[start : start + len(true)]
            if not len(span):
                continue
            against = slice(None) if video.ndim == 3 else slice(len(span))
            parts["truth"].setdefault(name, []).append(metrics.squared_errors(true[against], span))
            parts["steady"].setdefault(name, []).append(metrics.squared_errors(still_head[against], span))
            if name in absolute:
                parts["truth_abs"].setdefault(name, []).append(metrics.absolute_errors(true[against], span))
        start += len(true)
    return {kind: {name: np.concatenate(chunks) for name, chunks in named.items()} for kind, named in parts.items()}


def generator_render(settings: RenderSettings) -> Render:
    """Render through the real generator with these settings; the clip index is the seed."""

    def render(model: AvatarModel, clip: Clip, index: int) -> np.ndarray:
        return render_clip(model, clip, settings.model_copy(update={"seed": index}))

    return render


@torch.no_grad()
def portrait_reconstruction(vae: WanVAE, portrait: np.ndarray) -> dict:
    """PSNR of the VAE's reconstruction of the portrait (one frame encoded and decoded) over the picture and inside
    the face mesh's mouth box (None where the mesh finds no face): a mouth the VAE cannot draw, no generator using it
    can move."""
    from model.errors import InputError
    from model.eval.facemesh import facemesh_mouth_box

    recon = reconstruct(vae, portrait[None])
    mouth = None
    try:
        rows, cols = facemesh_mouth_box(portrait)
        inside = np.zeros(portrait.shape[:2], dtype=bool)
        inside[rows, cols] = True
        mouth = metrics.psnr(metrics.squared_errors(recon, portrait, inside)[0])
    except InputError:
        pass
    return {"psnr": metrics.psnr(metrics.squared_errors(recon, portrait)[0]), "mouth_psnr": mouth}


@torch.no_grad()
def reconstruct_clip(vae: WanVAE, clip: Clip) -> np.ndarray:
    """The VAE's own reconstruction of a clip (encode -> decode, as many frames as it takes: 1 + s*k), uint8 frames:
    the floor generators are judged by."""
    return reconstruct(vae, clip.frames[: vae.num_video_frames(vae.num_latent_frames(len(clip.frames)))])


@torch.no_grad()
def reconstruct(vae: WanVAE, frames: np.ndarray) -> np.ndarray:
    """uint8 frames (N, H, W, 3) encoded and decoded by the VAE in eval mode (its mode is restored after)."""
    was_training = vae.training
    vae.eval()
    recon = tensor_to_frames(vae.decode(vae.encode(frames_to_tensor(frames))))
    vae.train(was_training)
    return recon


def startup_excess_error(
    render_errors: np.ndarray,
    recon_errors: np.ndarray,
    temporal_stride: int,
    first_block_frames: int,
    block_frames: int,
) -> dict[str, float]:
    """How much worse than the VAE's own reconstruction the render is at its start: the render's per-frame mean
    absolute error against the truth (0-255) minus the reconstruction's, over frame 0 (the first latent frame, decoded
    alone), the next latent frame's frames, the rest of the first block, the second block, and everything after."""
    n = min(len(render_errors), len(recon_errors))
    excess = render_errors[:n] - recon_errors[:n]
    second_block = first_block_frames + block_frames
    spans = {
        "frame 0": (0, 1),
        "latent frame 1": (1, 1 + temporal_stride),
        "rest of block 0": (1 + temporal_stride, first_block_frames),
        "block 1": (first_block_frames, second_block),
        "later": (second_block, n),
    }
    return {name: float(excess[a:b].mean()) for name, (a, b) in spans.items() if b > a and a < n}


def mean_rows(rows: list[dict]) -> dict:
    out = {}
    for k in ROW_KEYS:
        values = [r[k] for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = float(np.mean(values)) if values else None
    return out


def window_is_worse(metric: str, first: float | None, value: float | None, tolerance: float = DRIFT_TOLERANCE) -> bool:
    """Whether a window's metric is more than `tolerance` worse than the first window's.

    lipsync_r worse = lower; a PSNR (dB) worse when its squared error grew by more than `tolerance` (10%: 0.41 dB);
    identity_error and boundary_jitter worse = higher; av_offset_frames is an
    integer count of frames, worse when |offset| exceeds both 1 frame (the target's bound) and (1 + tolerance) x the
    first |offset|.
    """
    if first is None or value is None:
        return False
    if metric in DECIBEL_KEYS:  # 10% worse in squared error, not 10% of a logarithm
        return value < first - 10 * math.log10(1 + tolerance)
    if metric in HIGHER_IS_BETTER:
        return value < first - tolerance * abs(first)
    if metric == "av_offset_frames":
        return abs(value) > max(1.0, (1 + tolerance) * abs(first))
    return value > (1 + tolerance) * first


def drift_check(windows: list[dict]) -> dict:
    """Every window against the first, per metric: the first value, every window's value and the windows that fail."""
    first = windows[0]
    out = {}
    keys = [k for k in DRIFT_KEYS if k in first]
    for k in keys:
        failing = [w["start_s"] for w in windows[1:] if window_is_worse(k, first[k], w[k])]
        out[k] = {"first": first[k], "values": [w[k] for w in windows], "failing_windows_start_s": failing}
    # One window has nothing to compare with: None, not a pass.
    out["passed"] = None if len(windows) < 2 else not any(out[k]["failing_windows_start_s"] for k in keys)
    return out


def target_check(
    rendered: list[dict], still: list[dict], photo: bool = False, steady: list[dict] | None = None
) -> dict:
    """The per-clip targets (module constants) against the rows of the render and of the still portrait; a
    target whose numbers are missing (no truth) is None, not a pass, per clip and in `met`. With the steady truth's
    rows, each clip also says how far over the still a render holding the head still could be at best
    (`ceiling_over_still_db`) and where the render is against the steady truth (`steady_psnr_over_still_db`)."""
    per_clip = []
    for i, row in enumerate(rendered):
        ref = still[i] if i < len(still) else {}
        ceiling = steady[i] if steady and i < len(steady) else None
        check = {
            "lipsync_r": row["lipsync_r"] >= TARGET_LIPSYNC_R,
            "av_offset_frames": abs(row["av_offset_frames"]) <= TARGET_MAX_ABS_OFFSET,
        }
        if photo:
            check["portrait_psnr"] = row["portrait_psnr"] >= TARGET_PHOTO_PSNR_DB
        elif row.get("truth_psnr") is not None and ref.get("truth_psnr") is not None:
            check["psnr_over_still_db"] = round(row["truth_psnr"] - ref["truth_psnr"], 3)
            check["frame0_over_still_db"] = round(row["truth_psnr_frame0"] - ref["truth_psnr_frame0"], 3)
            check["truth_psnr"] = check["psnr_over_still_db"] >= TARGET_PSNR_MARGIN_DB
            check["truth_psnr_frame0"] = check["frame0_over_still_db"] >= TARGET_FRAME0_MARGIN_DB
            if ceiling is not None:
                check["ceiling_over_still_db"] = round(ceiling["truth_psnr"] - ref["truth_psnr"], 3)
                check["steady_psnr_over_still_db"] = round(row[STEADY_KEY] - ref[STEADY_KEY], 3)
        else:
            check["truth_psnr"] = check["truth_psnr_frame0"] = None
        per_clip.append(check)
    names = sorted({k for c in per_clip for k, v in c.items() if isinstance(v, bool) or v is None})
    met = {}
    for k in names:
        values = [c.get(k) for c in per_clip]
        met[k] = None if any(v is None for v in values) else all(values)
    return {"per_clip": per_clip, "met": met}


def evaluate_checkpoint(
    checkpoint: str | None,
    clips: int,
    seconds: float,
    speech: str = "formant",
    step_plan: tuple[int, ...] | None = None,
    t_mci: float | None = None,
    urcr: bool = True,
    window_seconds: float = 30.0,
    references: bool = True,
    heldout: HeldOutSet = HELD_OUT,
    deflicker: bool = True,
    paste_back: bool = True,
    render: Render | None = None,
    sampler: str = "generator",
    photo: str | None = None,
    photo_framing: PhotoFraming = "fit",
    progress=print,
) -> dict:
    """Score `clips` held-out clips of `seconds`. `render` replaces the generator (a teacher's sampler), named by
    `sampler` in the result; the generator's settings (step plan, t_mci, URCR, deflicker, paste-back) apply only
    without it.

    `photo` (an image file, fitted to the model's size as a portrait is, or with `photo_framing="face"` cropped so
    its face sits where SynthTalk puts one, `face_framed_photo`) replaces every clip's portrait: a real photo driven
    by the held-out voices.
    It has no ground-truth video, so it is scored against itself (portrait_psnr outside the face mesh's mouth box)
    and its mouth is read by the face mesh, against the clip's phones."""
    model = AvatarModel.load(checkpoint)
    size = model.preset.video.height
    stride = model.preset.vae.temporal_stride
    layout = metrics.block_layout(stride, model.preset.generator.frames_per_block)
    pastes = paste_back and render is None  # a sampler of its own applies neither the step plan nor the paste-back
    if render is None:
        render = generator_render(
            RenderSettings(step_plan=step_plan, t_mci=t_mci, urcr=urcr, deflicker=deflicker, paste_back=paste_back)
        )
    if photo is not None and photo_framing == "face":
        if model.preset.video.width != size:
            raise ValueError(f"face framing is square, the model's frame is {model.preset.video.width}x{size}")
        photo_portrait = face_framed_photo(photo, size)
    elif photo is not None:
        from model.media.image import load_portrait

        photo_portrait = load_portrait(photo, size, model.preset.video.width)
    references = references and photo is None
    mouth = "facemesh" if photo is not None else "synth"
    rendered, vae_rows, still_rows, steady_rows, windows, checks, startup = [], [], [], [], [], [], []
    portraits = []  # the VAE's reconstruction of each clip's portrait (one row for a photo)
    seconds_taken, frames_rendered = 0.0, 0
    for i in range(clips):
        # The truth is held only for the VAE's reconstruction (a reference); else it is streamed, as the steady
        # truth always is, when the render is compared with them (compare_with_truth).
        clip = heldout.clip(i, seconds, size, speech, with_frames=references)
        steady = heldout.clip(i, seconds, size, speech, head_motion=0.0, with_frames=False) if photo is None else None
        if photo is not None:
            clip.portrait, clip.frames = photo_portrait, None  # nothing else of the synthetic face is used
        if photo is None or not portraits:
            portraits.append(portrait_reconstruction(model.vae, clip.portrait))
        phones = load_truth_phones(clip.truth)
        started = time.monotonic()
        frames = render(model, clip, i)
        seconds_taken += time.monotonic() - started
        frames_rendered += len(frames)
        result = score(
            frames,
            clip.fps,
            clip.portrait,
            clip.audio,
            phones=phones,
            window_seconds=window_seconds,
            mouth=mouth,
            faceless="closed",
            **layout,
        )
        videos = {"render": frames, "still": clip.portrait}
        if references:
            recon = reconstruct_clip(model.vae, clip)
            videos["recon"] = recon
        startup_videos = ("render", "recon") if references else ()  # startup_excess_error's
        errors = compare_with_truth(clip, steady, len(frames), videos, startup_videos) if photo is None else None
        truth, steady_errors = (errors["truth"], errors["steady"]) if errors else ({}, {})
        rendered.append(_metrics(result, frames, stride, layout, truth.get("render"), steady_errors.get("render")))
        windows.append(result["windows"])
        checks.append(drift_check(result["windows"]))
        if references:
            recon_score = score(recon, clip.fps, clip.portrait, clip.audio, phones=phones, mouth=mouth, **layout)
            vae_rows.append(_metrics(recon_score, recon, stride, layout, truth["recon"], steady_errors["recon"]))
            startup.append(
                startup_excess_error(errors["truth_abs"]["render"], errors["truth_abs"]["recon"], stride, **layout)
            )
            still = np.broadcast_to(clip.portrait, (len(frames), *clip.portrait.shape))  # a view: no copies
            still_score = score(still, clip.fps, clip.portrait, clip.audio, phones=phones, mouth=mouth, **layout)
            still_rows.append(_metrics(still_score, still, stride, layout, truth["still"], steady_errors["still"]))
        elif errors:  # the honest baseline costs no render: keep it even without the references
            still_rows.append(psnr_columns(truth["still"], steady_errors["still"]))
        if errors:  # and neither does the ceiling
            steady_rows.append(psnr_columns(truth["steady truth"]))
        line = {k: round(v, 4) if isinstance(v, float) else v for k, v in rendered[-1].items()}
        if still_rows:
            line["still truth_psnr"] = round(still_rows[-1]["truth_psnr"], 3)
            line["still truth_psnr_frame0"] = round(still_rows[-1]["truth_psnr_frame0"], 3)
            line["still steady_psnr"] = round(still_rows[-1][STEADY_KEY], 3)
        if steady_rows:
            line["steady truth truth_psnr"] = round(steady_rows[-1]["truth_psnr"], 3)
        progress(f"clip {i}: {line}")
    return {
        "checkpoint": checkpoint or "bundled",
        "model": model.description,
        "heldout": heldout.model_dump(),
        "photo": photo,
        "photo_framing": photo_framing if photo is not None else None,
        "clips": clips,
        "seconds": seconds,
        "speech": speech,
        "sampler": sampler,
        "step_plan": list(step_plan or model.preset.generator.step_plan),
        "t_mci": model.preset.generator.t_mci if t_mci is None else t_mci,
        "urcr": urcr,
        "deflicker": model.preset.generator.deflicker.model_dump() if deflicker else None,
        "paste_back": model.preset.generator.paste_back.model_dump() if pastes else None,
        "render_seconds": round(seconds_taken, 1),
        "video_frames_per_second": round(frames_rendered / seconds_taken, 2) if seconds_taken else None,
        "model_metrics": mean_rows(rendered),
        "vae_reconstruction": mean_rows(vae_rows) if references else None,
        "still_portrait": mean_rows(still_rows) if still_rows else None,
        "steady_truth": mean_rows(steady_rows) if steady_rows else None,
        "per_clip": rendered,
        "per_clip_still": still_rows or None,
        "per_clip_steady_truth": steady_rows or None,
        "per_clip_vae": vae_rows or None,
        "portrait_reconstruction": portraits,
        "targets": target_check(rendered, still_rows, photo=photo is not None, steady=steady_rows),
        "startup_excess_error": {k: float(np.mean([row[k] for row in startup])) for k in startup[0]}
        if startup
        else None,
        "window_seconds": window_seconds,
        "windows": windows,
        "drift_check": checks,
        "drift_passed": None if any(c["passed"] is None for c in checks) else all(c["passed"] for c in checks),
    }


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: the bundled model)")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--speech", choices=["formant", "espeak"], default="formant")
    parser.add_argument("--step-plan", default=None, help="e.g. 4 (PSB off) or 8,6,4")
    parser.add_argument("--t-mci", type=float, default=None)
    parser.add_argument("--no-urcr", action="store_true", help="ablation: positions grow past the trained horizon")
    parser.add_argument(
        "--no-deflicker",
        action="store_true",
        help="the decoder's frames without the preset's deflicker (generator.deflicker)",
    )
    parser.add_argument(
        "--no-paste-back",
        action="store_true",
        help="the decoder's frames without the preset's paste-back of the portrait (generator.paste_back)",
    )
    parser.add_argument("--window-seconds", type=float, default=30.0, help="drift windows")
    parser.add_argument("--no-references", action="store_true", help="skip the VAE-reconstruction and still rows")
    parser.add_argument("--identity-base", type=int, default=HELD_OUT.identity_base, help="held-out face seeds")
    parser.add_argument("--speaker-base", type=int, default=HELD_OUT.speaker_base, help="held-out voice seeds")
    parser.add_argument("--content-base", type=int, default=HELD_OUT.content_base, help="held-out content seeds")
    parser.add_argument(
        "--photo",
        default=None,
        help="a real portrait (e.g. examples/astronaut.jpg) driven by the held-out voices instead of the faces",
    )
    parser.add_argument(
        "--photo-framing",
        choices=["fit", "face"],
        default="fit",
        help="fit: the photo as a portrait is fitted (centre crop); face: cropped to its face, placed and sized as "
        "SynthTalk frames its faces (face mesh)",
    )
    parser.add_argument("--out", default=None, help="write the JSON here too")
    return parser


def run(args: argparse.Namespace, command: str, render: Render | None = None, sampler: str = "generator") -> dict:
    """The command line's evaluation: evaluate, record the command, write `--out`, print the summary."""
    plan = parse_step_plan(args.step_plan) if args.step_plan else None
    bases = {k: getattr(args, k) for k in ("identity_base", "speaker_base", "content_base")}
    heldout = HeldOutSet(**bases)
    result = evaluate_checkpoint(
        args.checkpoint,
        args.clips,
        args.seconds,
        args.speech,
        plan,
        args.t_mci,
        not args.no_urcr,
        args.window_seconds,
        not args.no_references,
        heldout=heldout,
        deflicker=not args.no_deflicker,
        paste_back=not args.no_paste_back,
        render=render,
        sampler=sampler,
        photo=args.photo,
        photo_framing=args.photo_framing,
        progress=lambda line: print(line, file=sys.stderr),
    )
    result["command"] = command
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "model_metrics",
                    "vae_reconstruction",
                    "still_portrait",
                    "steady_truth",
                    "targets",
                    "drift_passed",
                )
            },
            indent=2,
        )
    )
    print(psnr_summary(result))
    return result


def psnr_summary(result: dict) -> str:
    """One line with the render's PSNR against the truth next to the still portrait's (the honest baseline)."""
    m, s = result["model_metrics"], result.get("still_portrait") or {}
    c = result.get("steady_truth") or {}
    if m.get("truth_psnr") is None:
        line = f"portrait_psnr (outside the mouth) {m['portrait_psnr']:.2f} dB; lipsync_r {m['lipsync_r']:.3f}"
        (recon, *_) = result.get("portrait_reconstruction") or [None]
        if recon is not None:
            mouth = "n/a" if recon["mouth_psnr"] is None else f"{recon['mouth_psnr']:.2f} dB"
            line += f"; the VAE's reconstruction of the portrait {recon['psnr']:.2f} dB, inside the mouth box {mouth}"
        return line

    def db(row: dict, key: str) -> str:  # a reference that was not scored reads n/a
        return "n/a" if row.get(key) is None else f"{row[key]:.2f} dB"

    return (
        f"PSNR against the ground truth: render {db(m, 'truth_psnr')}, still portrait {db(s, 'truth_psnr')}, the "
        f"truth without its head sway (the best a steady render can be expected to do) {db(c, 'truth_psnr')}; frame "
        f"0: render {db(m, 'truth_psnr_frame0')}, still {db(s, 'truth_psnr_frame0')}; against the truth without its "
        f"sway: render {db(m, STEADY_KEY)}, still {db(s, STEADY_KEY)} (means over {result['clips']} clips)"
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run(args, "python -m model.eval.heldout " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
