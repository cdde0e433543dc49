"""`avatar-render render-one` and `model.render.render_to_mp4`: real generator, real ffmpeg, real files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from model.config import get_preset
from model.generator import AvatarModel, RenderSettings
from model.media import encode_audio, load_audio, measure_audio_duration, probe, save_wav
from model.media._ffmpeg import ffmpeg_exe
from model.render import render_to_mp4
from model.synth.speech import formant_speech

SPEECH_SECONDS = 1.3  # a few blocks: long enough for PSB's plan to reach its repeating step count
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "avatar-render")
FAST = ["--steps", "2,1"]  # the step plan only changes quality; fewer steps keep the tests fast


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A PNG and a JPEG portrait, the same speech as wav/flac/mp3/m4a/ogg/opus, and bad inputs."""
    d = tmp_path_factory.mktemp("inputs")
    speech = formant_speech(seed=3, seconds=SPEECH_SECONDS)
    save_wav(d / "speech.wav", speech.samples, speech.sample_rate)
    out = {"wav": str(d / "speech.wav")}
    for ext in ("flac", "mp3", "m4a", "ogg", "opus"):
        encode_audio(d / "speech.wav", d / f"speech.{ext}")
        out[ext] = str(d / f"speech.{ext}")
    face = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)  # not square: cropped
    Image.fromarray(face).save(d / "face.png")
    Image.fromarray(face).save(d / "face.jpg", quality=90)
    out["png"], out["jpg"] = str(d / "face.png"), str(d / "face.jpg")

    (d / "empty.wav").write_bytes(b"")
    (d / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    m4a = (d / "speech.m4a").read_bytes()
    (d / "truncated.m4a").write_bytes(m4a[: len(m4a) // 3])
    save_wav(d / "zero.wav", np.zeros(0), 16000)
    (d / "notes.png").write_text("not a picture\n" * 20)
    (d / "empty.jpg").write_bytes(b"")
    out.update(
        empty_audio=str(d / "empty.wav"),
        text_wav=str(d / "notes.wav"),
        truncated=str(d / "truncated.m4a"),
        zero=str(d / "zero.wav"),
        text_png=str(d / "notes.png"),
        empty_portrait=str(d / "empty.jpg"),
    )
    return out


def audio_codec(path) -> str | None:
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    match = re.search(r"Stream #\S+.*?: Audio: (\w+)", text)
    return match[1] if match else None


def assert_playable_and_in_sync(mp4, audio_path, size: int = 64) -> dict:
    info = probe(mp4)
    frame = 1.0 / info["fps"]
    assert info["fps"] == 25 and (info["width"], info["height"]) == (size, size)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["has_audio"] and audio_codec(mp4) == "aac"
    source_seconds = measure_audio_duration(audio_path)
    assert abs(info["frames"] / info["fps"] - source_seconds) < frame
    assert abs(info["duration"] - source_seconds) < frame
    assert abs(info["audio_duration"] - source_seconds) < frame
    return info


@pytest.fixture(scope="module")
def small(small_default_checkpoint) -> AvatarModel:
    """The suite's small 64x64 random model, from its checkpoint directory (the bundled 128x128 model is the console
    script's, below: it renders several times slower)."""
    return AvatarModel.load(small_default_checkpoint)


def test_render_to_mp4_streams_blocks_and_reports(small, files, tmp_path):
    calls = []
    out = tmp_path / "talk.mp4"
    result = render_to_mp4(
        small,
        files["png"],
        files["wav"],
        out,
        RenderSettings(seed=1, step_plan=(2, 1)),
        progress=lambda done, total: calls.append((done, total)),
    )
    info = assert_playable_and_in_sync(out, files["wav"])
    assert result["frames"] == info["frames"] and result["seconds"] == pytest.approx(info["frames"] / 25)
    assert result["blocks"] == len(calls) > 1
    done = [c[0] for c in calls]
    assert done == sorted(done) and calls[-1] == (info["frames"], info["frames"])  # ends exactly at the total
    assert set(result["timings"]) == {"inputs", "generate", "encode"}
    assert [p.name for p in tmp_path.iterdir()] == ["talk.mp4"]  # no temporary files left
    frames = probe(out)["frames"]
    assert frames == int(np.ceil(SPEECH_SECONDS * 25 - 1e-9))


@pytest.mark.parametrize("portrait,audio", [("jpg", "mp3"), ("png", "ogg")])
def test_cli_renders_portrait_and_audio_to_mp4(
    small, small_default_checkpoint, files, tmp_path, capsys, portrait, audio
):
    out = tmp_path / "out.mp4"
    code = main(
        [
            "render-one",
            "--checkpoint",
            str(small_default_checkpoint),
            "--portrait",
            files[portrait],
            "--audio",
            files[audio],
            "--out",
            str(out),
            "--seed",
            "3",
            "--no-progress",
            *FAST,
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"model: {small.description}" in stdout
    assert_playable_and_in_sync(out, files[audio])


def test_console_script_end_to_end(files, tmp_path):
    """The installed `avatar-render` script, in its own process, with its progress bar and the bundled model."""
    out = tmp_path / "out.mp4"
    proc = subprocess.run(
        [CONSOLE_SCRIPT, "render-one", "--portrait", files["png"], "--audio", files["wav"], "--out", str(out), *FAST],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "frame" in proc.stderr  # tqdm's bar counts video frames
    assert "model: bundled tiny model" in proc.stdout
    assert_playable_and_in_sync(out, files["wav"], size=get_preset("tiny").video.height)

    bad = subprocess.run(
        [
            CONSOLE_SCRIPT,
            "render-one",
            "--portrait",
            files["text_png"],
            "--audio",
            files["wav"],
            "--out",
            str(tmp_path / "bad.mp4"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        f"avatar-render render-one: error: {files['text_png']}: not an image in a supported format (PNG, JPEG, WebP)"
    ]


@pytest.mark.parametrize(
    "bad,problem",
    [
        ("empty_audio", "empty"),
        ("truncated", "cannot decode audio"),
        ("text_wav", "cannot decode audio"),
        ("zero", "zero length"),
        ("text_png", "not an image"),
        ("empty_portrait", "empty"),
    ],
)
def test_cli_bad_input_is_one_error_line_naming_the_file(files, tmp_path, capsys, bad, problem):
    portrait, audio = (
        (files[bad], files["wav"]) if bad in ("text_png", "empty_portrait") else (files["png"], files[bad])
    )
    out = tmp_path / "out.mp4"
    code = main(["render-one", "--portrait", portrait, "--audio", audio, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f": error: {files[bad]}: " in lines[0] and problem in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_cli_bad_step_plan_is_one_error_line(files, tmp_path, capsys):
    args = ["--portrait", files["png"], "--audio", files["wav"], "--out", str(tmp_path / "out.mp4")]
    code = main(["render-one", *args, "--steps", "8,0"])
    assert code == 2 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.strip() == (
        "avatar-render render-one: error: --steps: bad step plan '8,0': want positive integers such as 8,6,4"
    )


def test_same_speech_in_every_format_gives_the_same_frame_count(small, files):
    portrait = np.zeros((64, 64, 3), np.uint8)
    counts = {}
    for ext in ("wav", "flac", "mp3", "m4a", "ogg", "opus"):
        session = small.open(portrait, None, RenderSettings(step_plan=(1,)))
        session.feed_audio(load_audio(files[ext]), final=True)
        counts[ext] = sum(len(block.frames) for block in session)
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert abs(counts["wav"] - SPEECH_SECONDS * 25) <= 1, counts
