"""The portrait's paste-back: its own pixels where a decoded frame still shows it, the generator's frame elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_parts import small_preset
from test_generator import portrait, render, speech

from model.config import PasteBackConfig
from model.generator import AvatarModel, RenderSettings
from model.paste_back import PasteBack
from model.vae import StreamingDecoder, frames_to_tensor, tensor_to_frames

THRESHOLD = 16.0  # grey levels


def grey(levels: float) -> float:
    return levels / 127.5  # in the [-1, 1] units of video tensors


def test_a_threshold_of_zero_is_refused_not_divided_by():
    flat = torch.zeros((1, 3, 1, 2, 2))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        PasteBack(flat, flat, PasteBackConfig(threshold=0.0))


def test_the_gate_pastes_where_a_frame_matches_the_decoded_portrait_and_not_where_it_moved():
    portrait_px = torch.full((1, 3, 1, 2, 2), 0.5)
    decoded = torch.full((1, 3, 1, 2, 2), 0.4)  # the VAE lost 0.1 everywhere
    paste = PasteBack(portrait_px, decoded, PasteBackConfig(threshold=THRESHOLD))
    frame = decoded.clone()
    frame[0, 0, 0, 0, 1] += grey(THRESHOLD / 2)  # half the threshold on one channel: half the detail
    frame[0, 1, 0, 1, 0] += grey(THRESHOLD)  # moved: left alone
    frame[0, 2, 0, 1, 1] -= grey(3 * THRESHOLD)
    out = paste(frame)
    assert torch.allclose(out[0, :, 0, 0, 0], portrait_px[0, :, 0, 0, 0])  # unmoved: the portrait's own pixel
    assert torch.allclose(out[0, :, 0, 0, 1], frame[0, :, 0, 0, 1] + 0.05)
    assert torch.equal(out[0, :, 0, 1, 0], frame[0, :, 0, 1, 0])
    assert torch.equal(out[0, :, 0, 1, 1], frame[0, :, 0, 1, 1])


@pytest.fixture(scope="module")
def model() -> AvatarModel:
    preset = small_preset(pin_first_frame=True, paste_back=PasteBackConfig(threshold=THRESHOLD))
    return AvatarModel.random(preset, seed=0)


def decoded_portrait(model: AvatarModel, face: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        latent = model.vae.encode(frames_to_tensor(face[None]))
        return tensor_to_frames(StreamingDecoder(model.vae).decode_block(latent))[0]


def test_a_pinned_render_starts_on_the_portrait_exactly_and_keeps_the_generators_motion(model):
    face, audio = portrait(), speech(2.0)
    pasted = np.concatenate(render(model.open(face, None, RenderSettings(seed=1)), audio))
    plain = np.concatenate(render(model.open(face, None, RenderSettings(seed=1, paste_back=False)), audio))
    decoded = decoded_portrait(model, face)
    assert np.array_equal(plain[0], decoded) and not np.array_equal(decoded, face)  # the VAE's loss at frame 0 ...
    assert np.array_equal(pasted[0], face)  # ... is gone: frame 0 is the portrait
    # A pixel that moved from the decoded portrait by the threshold (plus the frames' rounding) is the generator's.
    moved = np.abs(plain.astype(int) - decoded.astype(int)).max(axis=-1) >= THRESHOLD + 2
    assert moved.mean() > 0.1  # a random model moves plenty
    assert np.array_equal(pasted[moved], plain[moved])
    assert not np.array_equal(pasted[~moved], plain[~moved])


def test_a_render_opened_from_a_latent_has_no_portrait_to_paste(model):
    face, audio = portrait(), speech(1.0)
    with torch.no_grad():
        latent = model.vae.encode(frames_to_tensor(face[None]))
    from_latent = np.concatenate(render(model.open_latent(latent, None, RenderSettings(seed=2)), audio))
    plain = np.concatenate(render(model.open(face, None, RenderSettings(seed=2, paste_back=False)), audio))
    assert np.array_equal(from_latent, plain)


def test_the_calibration_applies_each_threshold_as_a_render_would(model):
    """The calibration's pasted frames are the render's own at the preset's threshold (the decoded frames, not rounded
    ones, are gated; same blocks, seed and trimming); frame 0 of a pinned render is the portrait at every threshold."""
    from model.eval.heldout import VALIDATION, render_clip
    from model.train.calibrate_paste_back import calibrate, decoded_render

    clip = VALIDATION.clip(0, 1.0, model.preset.video.height)
    video, face, decoded = decoded_render(model, clip, seed=0)
    pasted = tensor_to_frames(PasteBack(face, decoded, model.preset.generator.paste_back)(video)[0])
    assert np.array_equal(pasted, render_clip(model, clip, RenderSettings(seed=0)))

    result = calibrate(model, [4.0, 1000.0], clips=1, seconds=1.0, progress=lambda _: None)
    table = result["by_threshold"]
    assert set(table) == {0.0, 4.0, 1000.0}
    # Chosen against the steady truth (what the face did, without the sway no render can know); both margins shown.
    assert result["chosen_threshold"] == max(table, key=lambda t: table[t]["steady_over_still_db"])
    assert all(
        len(row["per_clip_over_still_db"]) == len(row["per_clip_steady_over_still_db"]) == 1 for row in table.values()
    )
    # The steady truth is not the swaying one, so the two margins are two measures, not one printed twice.
    assert all(
        np.isfinite(row["steady_over_still_db"]) and row["steady_over_still_db"] != row["over_still_db"]
        for row in table.values()
    )
    assert table[4.0]["frame0_over_still_db"] == table[1000.0]["frame0_over_still_db"] == 0.0
    assert table[0.0]["frame0_over_still_db"] != 0.0
