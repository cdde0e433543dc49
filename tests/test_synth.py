"""SynthTalk: deterministic speech and faces, ground truth that matches, espeak-ng, the `synth` command."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from model.synth import PHONES, Identity, Speaker, formant_speech, load_truth_phones, make_clip, render_portrait
from model.synth.phones import PAUSE


def _check_timings(phones, seconds):
    assert phones[0].start == pytest.approx(0.0, abs=1e-6)
    assert phones[-1].end == pytest.approx(seconds, abs=1e-6)
    for p, q in zip(phones, phones[1:]):
        assert p.start < p.end <= q.start + 1e-9
        assert p.phone in PHONES


def test_formant_speech_is_deterministic_and_speech_like():
    seconds = 4.0
    a, b = formant_speech(3, seconds), formant_speech(3, seconds)
    assert np.array_equal(a.samples, b.samples) and a.phones == b.phones
    assert a.samples.dtype == np.float32 and len(a.samples) == int(seconds * 16000)
    _check_timings(a.phones, seconds)
    vowels = {n for n, p in PHONES.items() if p.kind == "vowel" and len(p.formants) >= 2}
    assert len(vowels) >= 5
    kinds = {PHONES[p.phone].kind for p in a.phones}
    assert {"vowel", "pause"} <= kinds and kinds & {"fricative", "plosive"}

    # Vowels are loud, pauses silent: the audio really follows its phone timings.
    def rms(kind):
        spans = [p for p in a.phones if PHONES[p.phone].kind == kind and p.end - p.start > 0.06]
        return np.mean(
            [np.sqrt(np.mean(a.samples[int(p.start * 16000) + 160 : int(p.end * 16000) - 160] ** 2)) for p in spans]
        )

    assert rms("vowel") > 20 * rms("pause")
    # Another speaker seed changes the voice, not the words.
    other = formant_speech(3, seconds, speaker_seed=99)
    assert Speaker.from_seed(3) != Speaker.from_seed(99)
    assert not np.allclose(other.samples, a.samples)


def test_identities_are_distinct_and_render_at_any_size():
    portraits = np.stack([render_portrait(Identity.from_seed(s)) for s in range(60)]).astype(np.float32)
    diffs = np.abs(portraits[:, None] - portraits[None]).mean(axis=(2, 3, 4))
    assert diffs[~np.eye(len(portraits), dtype=bool)].min() > 2.0  # every pair differs visibly (of 255)
    identity = Identity.from_seed(5)
    assert render_portrait(identity, 96, 128).shape == (96, 128, 3)
    big, small = render_portrait(identity, 256), render_portrait(identity, 64)
    shrunk = big.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(shrunk - small).mean() < 6  # the same face at any resolution


def test_clip_ground_truth_and_separable_seeds():
    clip = make_clip(11, 3.0, identity_seed=100, speaker_seed=200)
    n = 75
    assert clip.frames.shape == (n, 64, 64, 3) and clip.portrait.shape == (64, 64, 3)
    frames = clip.truth["frames"]
    for name in ("opening", "width", "rounding", "dx", "dy", "roll", "scale", "blink"):
        assert len(frames[name]) == n
    assert max(frames["opening"]) > 0.5 and min(frames["opening"]) < 0.05  # the mouth opens and closes
    _check_timings(load_truth_phones(clip.truth), 3.0)
    same_face = make_clip(12, 3.0, identity_seed=100, speaker_seed=201)
    assert np.array_equal(same_face.portrait, clip.portrait)
    assert not np.allclose(same_face.audio, clip.audio)
    other_face = make_clip(11, 3.0, identity_seed=101, speaker_seed=200)
    assert np.array_equal(other_face.audio, clip.audio)  # same words, same voice
    assert not np.array_equal(other_face.portrait, clip.portrait)


def test_a_clip_without_its_frames_renders_the_same_frames_chunk_by_chunk():
    """`with_frames=False` (long evaluations): nothing held, and `chunks` renders exactly the held clip's frames, in
    chunks of a fixed size that a held clip's `chunks` slices alike (streams of two clips line up)."""
    held = make_clip(5, 12.0, identity_seed=7, speaker_seed=8)  # 300 frames: more than one chunk
    streamed = make_clip(5, 12.0, identity_seed=7, speaker_seed=8, with_frames=False)
    assert streamed.frames is None and np.array_equal(streamed.audio, held.audio)
    streamed_chunks, held_chunks = list(streamed.chunks()), list(held.chunks())
    assert len(streamed_chunks) > 1 and [len(c) for c in streamed_chunks] == [len(c) for c in held_chunks]
    assert np.array_equal(np.concatenate(streamed_chunks), held.frames)


def test_blinks_and_head_motion_do_not_depend_on_the_audio():
    a = make_clip(21, 3.0, speaker_seed=1)
    b = make_clip(21, 3.0, speaker_seed=2)
    for name in ("dx", "dy", "roll", "scale", "blink"):
        assert a.truth["frames"][name] == b.truth["frames"][name]
    assert max(a.truth["frames"]["blink"]) > 0.9  # at least one full blink in 3 s


def test_espeak_speaks_sentences_with_phone_timings():
    from model.synth.espeak import espeak_speech

    seconds = 4.0
    speech = espeak_speech(2, seconds)
    assert len(speech.samples) == int(seconds * 16000)
    _check_timings(speech.phones, seconds)
    vowels = [p for p in speech.phones if PHONES[p.phone].kind == "vowel"]
    assert len(vowels) >= 8 and len({p.phone for p in vowels}) >= 3
    speaking = np.zeros(len(speech.samples), dtype=bool)
    for p in speech.phones:
        if p.phone != PAUSE:
            speaking[int(p.start * 16000) : int(p.end * 16000)] = True
    loud = np.sqrt(np.mean(speech.samples[speaking] ** 2))
    quiet = np.sqrt(np.mean(speech.samples[~speaking] ** 2))
    assert loud > 5 * quiet  # the timings say where the speech is
    # It does not depend on what the process spoke before (espeak-ng keeps state between utterances: spoken twice in
    # one process, this clip correlated 0.61 with itself and its phones moved).
    again = espeak_speech(2, seconds)
    assert again.phones == speech.phones and np.corrcoef(again.samples, speech.samples)[0, 1] > 0.99
    # The same faces are driven by it.
    clip = make_clip(2, 2.0, speech="espeak")
    assert max(clip.truth["frames"]["opening"]) > 0.4


def test_synth_command_writes_a_manifest_that_parses(tmp_path, capsys):
    from cli.main import main
    from model.media.video import probe

    out = tmp_path / "synthtalk"
    assert main(["synth", "--out", str(out), "--clips", "2", "--seconds", "2", "--seed", "4"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["clip_00000", "clip_00001"]
    for row in rows:
        assert set(row) == {"id", "portrait", "audio", "video", "truth"}
        for key in ("portrait", "audio", "video", "truth"):
            assert not os.path.isabs(row[key]) and (out / row[key]).is_file()
        info = probe(out / row["video"])
        assert info["frames"] == 50 and info["has_audio"] and (info["width"], info["height"]) == (64, 64)
        truth = json.loads((out / row["truth"]).read_text())
        assert truth["num_frames"] == 50 and len(truth["frames"]["opening"]) == 50


def test_faces_carry_photo_textures_that_move_with_the_head():
    """Skin, hair and clothes are sampled from skimage photographs in face units; the background stays put."""
    from model.synth import render
    from model.synth.texture import SCENES, photograph

    identity = Identity.from_seed(7)
    assert identity.background_photo.name in SCENES and "astronaut" not in SCENES
    with pytest.raises(ValueError, match="held out"):
        photograph("astronaut")
    rest = np.array([[0.0, 0.0, 0.0, 1.0]], np.float32)
    mouth = np.array([[0.0, 0.5, 0.0]], np.float32)
    still = render(identity, rest, mouth, np.zeros(1, np.float32), 128)[0].astype(np.float32)
    # Texture: the clothes and the background are not flat colours.
    assert still[120:, 40:88].std(axis=(0, 1)).max() > 4 and still[:12, :12].std(axis=(0, 1)).max() > 0.5
    # A head moved right by 4 pixels: its clothes' pattern moves with it, the background's corner does not.
    moved = rest.copy()
    moved[0, 0] = 4 / 128
    shifted = render(identity, moved, mouth, np.zeros(1, np.float32), 128)[0].astype(np.float32)
    assert np.abs(shifted[120:, 44:84] - still[120:, 40:80]).mean() < 0.5 * np.abs(shifted - still)[120:, 44:84].mean()
    assert np.array_equal(shifted[:12, :12], still[:12, :12])
    # The open mouth shows the teeth: bright pixels inside it, none when closed.
    open_mouth = render(identity, rest, np.array([[1.0, 0.5, 0.0]], np.float32), np.zeros(1, np.float32), 128)[0]
    lips = slice(int(0.55 * 128), int(0.8 * 128)), slice(48, 80)
    teeth = np.asarray(identity.teeth) * 255
    near_teeth = lambda image: (np.abs(image[lips].astype(np.float32) - teeth).max(axis=-1) < 20).sum()  # noqa: E731
    assert near_teeth(open_mouth) > 10 and near_teeth(still.astype(np.uint8)) == 0


def test_framing_moves_and_scales_the_head_not_the_background():
    from model.synth import Framing

    identity = Identity.from_seed(3)
    default = render_portrait(identity, 128).astype(np.float32)
    small_high = render_portrait(identity, 128, framing=Framing(zoom=0.5, dx=0.0, dy=-0.2)).astype(np.float32)
    assert np.array_equal(render_portrait(identity, 128, framing=Framing()), default.astype(np.uint8))

    def eyes(image):  # (row, column distance between the two eyes) of the eye whites
        white = np.abs(image - 0.95 * 255).max(axis=-1) < 12
        rows, cols = np.nonzero(white)
        left, right = cols[cols < cols.mean()], cols[cols >= cols.mean()]
        return rows.mean(), right.mean() - left.mean()

    (row, spacing), (row2, spacing2) = eyes(default), eyes(small_high)
    assert spacing2 / spacing == pytest.approx(0.5, abs=0.08)  # half the size
    assert row2 < row - 0.15 * 128  # higher up
    assert np.array_equal(small_high[:6, :6], default[:6, :6])  # the background stays
