"""The metrics measure what they claim: on ground-truth SynthTalk videos, on broken ones, and on a real photo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.eval import evaluate, score
from model.eval.metrics import block_boundaries, boundary_jitter, frame_changes
from model.synth import FPS, load_truth_phones, make_clip, shift_phones, write_clip

DELAY_FRAMES = 5
LONG_SECONDS = 60.0  # enough block boundaries (~125) for the seam ratio to settle near 1 on ground truth


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A 60-s ground-truth clip written to disk and decoded back (what a renderer's output looks like)."""
    from model.media.audio import load_audio
    from model.media.video import read_video

    out = tmp_path_factory.mktemp("synthtalk")
    clip = make_clip(0, LONG_SECONDS)
    row = write_clip(clip, out)
    paths = {k: str(out / v) for k, v in row.items() if k != "id"}
    frames, fps = read_video(paths["video"])
    audio = load_audio(paths["audio"])
    return {"paths": paths, "frames": frames, "fps": fps, "audio": audio, "clip": clip, "dir": out}


def test_ground_truth_video_scores_as_perfect(long_clip):
    p = long_clip["paths"]
    result = evaluate(p["video"], p["portrait"], p["audio"], p["truth"])
    assert result["lipsync_reference"] == "phones" and result["mouth_method"] == "synth"
    assert result["lipsync_r"] >= 0.95
    assert result["av_offset_frames"] == 0
    assert result["boundary_jitter"] == pytest.approx(1.0, abs=0.05)
    assert result["identity_error"] < 0.03
    assert result["frames"] == int(LONG_SECONDS * FPS)
    assert len(result["windows"]) == 2 and all(w["lipsync_r"] >= 0.95 for w in result["windows"])
    assert set(result["drift"]) == {
        f"{m}_per_min" for m in ("lipsync_r", "av_offset_frames", "identity_error", "portrait_psnr", "boundary_jitter")
    }
    assert 25 < result["portrait_psnr"] < 60  # the head sways: close to the portrait, not a copy of it
    assert abs(result["drift"]["lipsync_r_per_min"]) < 0.05  # ground truth does not drift


def test_without_truth_the_audio_envelope_is_the_reference(long_clip):
    c = long_clip
    result = score(c["frames"], c["fps"], c["clip"].portrait, c["audio"])
    assert result["lipsync_reference"] == "envelope"
    assert result["av_offset_frames"] == 0
    assert result["lipsync_r"] > 0.4


def test_audio_delayed_by_5_frames_reads_offset_5(long_clip):
    c = long_clip
    phones = load_truth_phones(json.loads(open(c["paths"]["truth"]).read()))
    delayed = shift_phones(phones, DELAY_FRAMES / FPS)
    result = score(c["frames"], c["fps"], c["clip"].portrait, c["audio"], phones=delayed)
    assert result["av_offset_frames"] == DELAY_FRAMES
    assert result["lipsync_r"] < 0.9  # misaligned: the zero-lag correlation drops
    early = score(
        c["frames"], c["fps"], c["clip"].portrait, c["audio"], phones=shift_phones(phones, -DELAY_FRAMES / FPS)
    )
    assert early["av_offset_frames"] == -DELAY_FRAMES
    # The same through the audio itself: delay the speech (silence in front), no truth file.
    pad = int(DELAY_FRAMES / FPS * 16000)
    late_audio = np.concatenate([np.zeros(pad, dtype=np.float32), c["audio"][:-pad]])
    assert score(c["frames"], c["fps"], c["clip"].portrait, late_audio)["av_offset_frames"] == DELAY_FRAMES


def test_frozen_mouth_has_no_lipsync():
    clip = make_clip(3, 20.0, freeze_mouth=True)
    result = score(clip.frames, FPS, clip.portrait, clip.audio, phones=load_truth_phones(clip.truth))
    assert abs(result["lipsync_r"]) < 0.2
    moving = make_clip(3, 20.0)
    assert (
        score(moving.frames, FPS, moving.portrait, moving.audio, phones=load_truth_phones(moving.truth))["lipsync_r"]
        >= 0.95
    )


def test_seams_at_block_boundaries_raise_jitter(long_clip):
    frames = long_clip["frames"]
    boundaries = block_boundaries(len(frames))
    assert boundaries[0] == 9 and boundaries[1] - boundaries[0] == 12
    # Each block re-renders the scene a little brighter or darker: a visible jump at every seam.
    block_of = np.searchsorted(boundaries, np.arange(len(frames)), side="right")
    offsets = np.where(block_of % 2 == 0, 0, 6).astype(np.int16)
    seamed = np.clip(frames.astype(np.int16) + offsets[:, None, None, None], 0, 255).astype(np.uint8)
    assert boundary_jitter(frame_changes(seamed), boundaries) > 2.0
    # Boundaries in the wrong place do not see the seams as seams.
    assert boundary_jitter(frame_changes(frames), block_boundaries(len(frames), 12, 15)) == pytest.approx(1.0, abs=0.1)


def test_identity_error_grows_for_another_face(long_clip):
    c = long_clip
    own = score(c["frames"][:250], c["fps"], c["clip"].portrait, c["audio"])["identity_error"]
    stranger = make_clip(0, 10.0, identity_seed=12345)
    other = score(stranger.frames, FPS, c["clip"].portrait, c["audio"])["identity_error"]
    assert 0 < own < 0.03 and other > 3 * own


def test_eval_command_json(tmp_path, capsys):
    from cli.main import main
    from model.synth import write_dataset

    write_dataset(tmp_path, 1, 10.0, seed=5, speech="espeak")
    clip = tmp_path / "clip_00000"
    argv = [
        "eval",
        str(clip / "video.mp4"),
        "--portrait",
        str(clip / "portrait.png"),
        "--audio",
        str(clip / "audio.wav"),
        "--truth",
        str(clip / "truth.json"),
        "--json",
    ]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in (
        "lipsync_r",
        "av_offset_frames",
        "identity_error",
        "boundary_jitter",
        "lipsync_reference",
        "frames",
        "windows",
        "drift",
    ):
        assert key in result
    assert result["lipsync_r"] >= 0.95 and result["av_offset_frames"] == 0 and result["frames"] == 250
    # Seams where the bundled model's blocks end (a latent per frame, 3 a block); --preset or the flags say otherwise.
    assert (result["first_block_frames"], result["block_frames"]) == (3, 3)
    assert main(argv + ["--preset", "livetalk-1.3b"]) == 0
    livetalk = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (livetalk["first_block_frames"], livetalk["block_frames"]) == (9, 12)
    assert main(argv + ["--block-frames", "6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["block_frames"] == 6


def warp_mouth_open(image: np.ndarray, openings: np.ndarray) -> np.ndarray:
    """Frames of a real face whose mouth is opened by a warp, one frame per opening in [0, 1] (of 1.2x the mouth's
    half width): the jaw drops and the gap is dark. The face mesh finds the mouth on `image`."""
    from scipy.ndimage import map_coordinates

    from model.eval.facemesh import FaceMesh

    with FaceMesh() as mesh:
        points = mesh.landmarks(image)
    assert points is not None, "the face mesh finds the face"
    mx = (points[61, 0] + points[291, 0]) / 2  # mouth corners
    my = (points[13, 1] + points[14, 1]) / 2  # between the inner lips
    half = (points[291, 0] - points[61, 0]) / 2
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float32)
    along = np.exp(-0.5 * ((xx - mx) / (1.6 * half)) ** 2)
    below = np.clip((yy - my) / 4 + 0.5, 0, 1) * np.exp(-np.clip(yy - my - 2 * half, 0, None) / (1.5 * half))
    frames = []
    for gap in 1.2 * half * np.asarray(openings, dtype=np.float32):
        src = [yy - gap * along * below, xx]
        warped = np.stack([map_coordinates(image[..., ch].astype(np.float32), src, order=1) for ch in range(3)], -1)
        inside = ((xx - mx) / (0.8 * half)) ** 2 + ((yy - my - gap / 2) / (gap / 2 + 1e-3)) ** 2 < 1
        warped[inside] = (40, 15, 20)
        frames.append(np.clip(warped, 0, 255).astype(np.uint8))
    return np.stack(frames)


def _astronaut_opening_mouth(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """skimage's astronaut with her mouth opened wider every frame."""
    import skimage.data

    openings = np.linspace(0, 1, steps)
    return warp_mouth_open(skimage.data.astronaut(), openings), openings


def test_psnr_from_squared_errors_per_frame_and_outside_a_mask():
    from model.eval.metrics import psnr, squared_errors

    reference = np.full((8, 8, 3), 100, np.uint8)
    frames = np.stack([reference, reference + 10, reference])
    frames[2, :2] = 255  # a bright band on the last frame...
    mask = np.ones((8, 8), bool)
    mask[:2] = False  # ...that the mask leaves out
    assert squared_errors(frames, reference).tolist() == pytest.approx([0.0, 100.0, 155**2 / 4])
    assert squared_errors(frames, reference, mask).tolist() == pytest.approx([0.0, 100.0, 0.0])
    assert squared_errors(frames, frames).tolist() == [0.0, 0.0, 0.0]  # one reference frame per frame
    assert psnr(100.0) == pytest.approx(10 * np.log10(255**2 / 100))  # 28.13 dB
    assert psnr(0.0) == pytest.approx(100.0)  # an exact copy reads 100 dB, not infinity
    assert psnr(squared_errors(frames[:2], reference).mean()) == pytest.approx(psnr(50.0))  # the clip's mean MSE


def test_facemesh_finds_and_tracks_the_astronauts_mouth():
    from scipy.stats import spearmanr

    from model.eval.facemesh import facemesh_mouth_box, facemesh_opening

    frames, gaps = _astronaut_opening_mouth(10)
    rows, cols = facemesh_mouth_box(frames[0])
    assert rows.start < 150 < rows.stop and cols.start < 224 < cols.stop  # her mouth, near (224, 146)
    opening = facemesh_opening(frames)
    assert not np.isnan(opening).any()
    assert spearmanr(opening, gaps).statistic > 0.8
    assert opening[-1] > 2 * opening[0]


def test_a_photo_framed_on_its_face_shows_it_where_synthtalk_puts_faces(tmp_path):
    """--photo-framing face: wherever the face is in the photo, the crop puts it at SynthTalk's place and size (the
    plain fit leaves the astronaut's face less than half that tall); within the face mesh's own jitter."""
    import skimage.data
    from PIL import Image

    from model.eval.facemesh import face_oval_box
    from model.eval.heldout import face_framed_photo, synth_face_place
    from model.media.image import load_portrait

    x, y, height = (v * 128 for v in synth_face_place(128))
    framed = face_framed_photo("examples/astronaut.jpg", 128)
    found_x, found_y, found_height = face_oval_box(framed)
    assert abs(found_x - x) < 3 and abs(found_y - y) < 3 and found_height == pytest.approx(height, rel=0.08)
    assert face_oval_box(load_portrait("examples/astronaut.jpg", 128, 128))[2] < height / 2
    # The same photo inside a larger grey canvas, further right and down: the same face, the same framing.
    canvas = np.full((800, 700, 3), 128, np.uint8)
    canvas[250:762, 150:662] = skimage.data.astronaut()
    Image.fromarray(canvas).save(tmp_path / "moved.png")
    moved_x, moved_y, moved_height = face_oval_box(face_framed_photo(str(tmp_path / "moved.png"), 128))
    assert abs(moved_x - x) < 3 and abs(moved_y - y) < 3 and moved_height == pytest.approx(height, rel=0.08)


def test_errors_against_the_streamed_truth_are_those_of_the_held_frames():
    """compare_with_truth streams the truth and the steady truth chunk by chunk; its per-frame errors are those
    computed on the whole held clips, for a render shorter than the clip that ends inside a chunk, one shorter still
    (a VAE reconstruction) and an image shown in every frame."""
    from model.eval.heldout import HeldOutSet, compare_with_truth
    from model.eval.metrics import absolute_errors, squared_errors

    heldout = HeldOutSet()
    truth, steady = heldout.clip(0, 12.0, 64), heldout.clip(0, 12.0, 64, head_motion=0.0)
    rng = np.random.default_rng(0)
    render = rng.integers(0, 256, (290, 64, 64, 3), dtype=np.uint8)  # 300 truth frames in chunks of 250
    recon = render[:281] // 2
    streamed = compare_with_truth(
        heldout.clip(0, 12.0, 64, with_frames=False),
        heldout.clip(0, 12.0, 64, head_motion=0.0, with_frames=False),
        len(render),
        {"render": render, "recon": recon, "still": truth.portrait},
        absolute=("render", "recon", "still"),
    )
    for name, video in (("render", render), ("recon", recon), ("still", truth.portrait)):
        n = len(render) if video.ndim == 3 else len(video)
        assert np.array_equal(streamed["truth"][name], squared_errors(truth.frames[:n], video))
        assert np.array_equal(streamed["steady"][name], squared_errors(steady.frames[:n], video))
        assert np.array_equal(streamed["truth_abs"][name], absolute_errors(truth.frames[:n], video))
    assert np.array_equal(streamed["truth"]["steady truth"], squared_errors(truth.frames[:290], steady.frames))


def test_the_steady_truth_is_the_same_clip_with_the_head_held_still():
    """The ceiling of a render that holds the head still: the held-out clip's mouth and blinks, without the sway."""
    from model.eval.heldout import HELD_OUT, truth_psnr

    clip = HELD_OUT.clip(0, 4.0, 64)
    steady = HELD_OUT.clip(0, 4.0, 64, head_motion=0.0)
    for name in ("opening", "width", "rounding", "blink"):
        assert steady.truth["frames"][name] == clip.truth["frames"][name]
    assert not np.any(steady.truth["frames"]["dx"]) and np.any(clip.truth["frames"]["dx"])
    np.testing.assert_array_equal(steady.portrait, clip.portrait)
    # Against the swaying truth the steady one beats the still portrait (it has the mouth), but is not the truth.
    ceiling, still = truth_psnr(steady.frames, clip.frames), truth_psnr(clip.portrait, clip.frames)
    assert still["truth_psnr"] < ceiling["truth_psnr"] < 60
    assert truth_psnr(clip.portrait, clip.frames, steady.frames)["steady_psnr"] > still["truth_psnr"]


def test_the_psnr_summary_reads_references_that_were_not_scored_as_na():
    from model.eval.heldout import psnr_summary

    render = {"truth_psnr": 24.0, "truth_psnr_frame0": 25.0, "steady_psnr": 30.0}
    line = psnr_summary(
        {"model_metrics": render, "still_portrait": None, "steady_truth": {"truth_psnr": None}, "clips": 1}
    )
    assert "render 24.00 dB, still portrait n/a" in line and "render 30.00 dB, still n/a" in line


def test_psnr_against_a_truth_video_comes_with_the_still_portraits(tmp_path):
    """`score_truth_video` (the report's and `avatar-render eval --truth-video`'s numbers): the render's PSNR against
    a ground-truth video, streamed, beside the still portrait's against the same frames; another size is fitted, a
    shorter truth is scored over the frames both have, another frame rate is refused naming the truth."""
    from PIL import Image

    from model.errors import InputError
    from model.eval import metrics
    from model.eval.evaluate import TRUTH_VIDEO_METRICS, score_truth_video
    from model.media import read_video
    from model.media.video import VideoWriter

    row = write_clip(make_clip(0, 2.0, size=64), tmp_path)
    p = {k: str(tmp_path / v) for k, v in row.items() if k != "id"}
    frames, _ = read_video(p["video"])
    portrait = np.asarray(Image.open(p["portrait"]).convert("RGB"))
    still = metrics.squared_errors(frames, portrait)

    same = score_truth_video(p["video"], p["video"], p["portrait"])
    assert same["truth_psnr"] == same["truth_psnr_frame0"] == 100.0 and same["truth_frames"] == len(frames) == 50
    assert same["still_truth_psnr"] == pytest.approx(metrics.psnr(still.mean()))
    assert same["still_truth_psnr_frame0"] == pytest.approx(metrics.psnr(still[0]))
    assert same["still_truth_psnr"] < 40  # the portrait is not the moving face

    big = tmp_path / "big.mp4"
    with VideoWriter(big, FPS, 128, 128, crf=0) as writer:
        writer.write(frames[:30].repeat(2, axis=1).repeat(2, axis=2))
    fitted = score_truth_video(p["video"], big, p["portrait"])
    assert fitted["truth_frames"] == 30 and 30 < fitted["truth_psnr"] < 100

    other_rate = tmp_path / "30fps.mp4"
    with VideoWriter(other_rate, 30, 64, 64) as writer:
        writer.write(frames[:10])
    with pytest.raises(InputError, match=r"30fps.mp4: truth video is 30 fps, the render 25 fps"):
        score_truth_video(p["video"], other_rate, p["portrait"])

    with pytest.raises(InputError, match=r"big.mp4: truth video is 128x128, over the limit of 10000 pixels"):
        score_truth_video(p["video"], big, p["portrait"], max_pixels=10_000)  # from the header, before decoding

    scores = evaluate(p["video"], p["portrait"], p["audio"], truth_video_path=p["video"])
    assert {k: scores[k] for k in TRUTH_VIDEO_METRICS} == {k: same[k] for k in TRUTH_VIDEO_METRICS}
