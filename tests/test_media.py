"""Media I/O against the real ffmpeg binary: audio formats, bad inputs, portraits, mp4 writing and concat."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from model.errors import InputError
from model.media import (
    EncoderKilledError,
    VideoWriter,
    concat_mp4,
    encode_audio,
    load_audio,
    load_portrait,
    probe,
    read_video,
    save_wav,
    stream_video,
)

FPS = 25
FRAME_SECONDS = 1.0 / FPS
SPEECH_SECONDS = 1.37


def speech_like(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Voiced harmonics under a syllable-rate envelope, noise bursts and a pause."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(h * phase) / h for h in range(1, 12)) * (np.sin(2 * np.pi * 3 * t) > -0.2)
    noise = rng.standard_normal(t.size) * (np.sin(2 * np.pi * 1.3 * t) > 0.8)
    pause = (t < seconds * 0.7) | (t > seconds * 0.8)
    return (0.25 * voiced + 0.05 * noise) * pause


def frames_pattern(n: int, height: int = 32, width: int = 48, offset: int = 0) -> np.ndarray:
    """Smoothly moving colour gradients (compress well, every frame different)."""
    t = np.arange(offset, offset + n)[:, None, None]
    y, x = np.mgrid[:height, :width]
    r = 128 + 100 * np.sin(0.2 * x + 0.3 * t)
    g = 128 + 100 * np.cos(0.15 * y - 0.2 * t)
    b = (x + y + 5 * t) % 256
    return np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8)


@pytest.mark.parametrize("sample_rate", [16000, 22050, 44100])
def test_load_audio_same_duration_across_formats_rates_and_channels(tmp_path, sample_rate):
    reference = speech_like(SPEECH_SECONDS, 16000)
    for channels in (1, 2):
        signal = speech_like(SPEECH_SECONDS, sample_rate)
        if channels == 2:
            signal = np.stack([signal, 0.5 * signal], axis=1)
        wav = tmp_path / f"speech_{channels}.wav"
        save_wav(wav, signal, sample_rate)
        for ext in (".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus"):
            path = wav if ext == ".wav" else tmp_path / f"speech_{channels}{ext}"
            if ext != ".wav":
                encode_audio(wav, path)
            samples = load_audio(path, sample_rate=16000)
            assert samples.dtype == np.float32 and samples.ndim == 1
            assert np.abs(samples).max() <= 1.0
            assert abs(samples.size / 16000 - SPEECH_SECONDS) < FRAME_SECONDS, (ext, channels)
            # Same signal: loudness within 30% (stereo down-mix averages the two channels).
            expected_rms = np.sqrt(np.mean(reference**2)) * (0.75 if channels == 2 else 1.0)
            assert np.sqrt(np.mean(samples**2)) == pytest.approx(expected_rms, rel=0.3), (ext, channels)


def test_lossless_audio_round_trip_is_exact_to_16_bits(tmp_path):
    signal = speech_like(0.5, 16000)
    save_wav(tmp_path / "a.wav", signal, 16000)
    encode_audio(tmp_path / "a.wav", tmp_path / "a.flac")
    for name in ("a.wav", "a.flac"):
        np.testing.assert_allclose(load_audio(tmp_path / name), signal, atol=1.0 / 32767)


def _bad_audio_files(tmp_path) -> dict[str, str]:
    save_wav(tmp_path / "good.wav", speech_like(1.0, 16000), 16000)
    encode_audio(tmp_path / "good.wav", tmp_path / "good.m4a")
    files = {"missing": str(tmp_path / "missing.wav")}
    (tmp_path / "empty.wav").write_bytes(b"")
    files["empty"] = str(tmp_path / "empty.wav")
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    files["not audio"] = str(tmp_path / "notes.wav")
    m4a = (tmp_path / "good.m4a").read_bytes()
    (tmp_path / "truncated.m4a").write_bytes(m4a[: len(m4a) // 3])  # moov atom lost: undecodable
    files["truncated"] = str(tmp_path / "truncated.m4a")
    save_wav(tmp_path / "zero.wav", np.zeros(0), 16000)
    files["zero length"] = str(tmp_path / "zero.wav")
    with VideoWriter(tmp_path / "silent.mp4", FPS, 48, 32) as writer:
        writer.write(frames_pattern(5))
    files["no audio stream"] = str(tmp_path / "silent.mp4")
    Image.new("RGB", (16, 16)).save(tmp_path / "picture.png")
    files["unsupported format"] = str(tmp_path / "picture.png")
    return files


def test_load_audio_bad_inputs_raise_input_error_naming_the_file(tmp_path):
    expected = {
        "missing": "not found",
        "empty": "empty",
        "not audio": "Invalid data",  # ffmpeg's own reason is kept
        "truncated": "cannot decode",
        "zero length": "zero length",
        "no audio stream": "no audio stream",
        "unsupported format": "not a supported audio format",
    }
    for kind, path in _bad_audio_files(tmp_path).items():
        with pytest.raises(InputError) as err:
            load_audio(path)
        assert err.value.source == path, kind
        assert str(err.value).startswith(path + ": "), kind
        assert expected[kind] in err.value.problem, (kind, err.value.problem)


def test_load_portrait_crops_centre_and_resizes(tmp_path):
    # A wide image whose centre square is red and whose sides are green: cropping to square keeps only red.
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100] = wide[:, 200:] = (0, 255, 0)
    wide[:, 100:200] = (255, 0, 0)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = load_portrait(tmp_path / "wide.png", 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[..., 0] > 240).all() and (out[..., 1] < 15).all()

    # A tall RGBA JPEG-free path and a grayscale one come back as RGB at the asked size.
    Image.fromarray(wide.transpose(1, 0, 2)).convert("RGBA").save(tmp_path / "tall.png")
    assert load_portrait(tmp_path / "tall.png", 64, 48).shape == (64, 48, 3)
    Image.fromarray(wide[..., 1]).save(tmp_path / "gray.jpg", quality=95)
    assert load_portrait(tmp_path / "gray.jpg", 16, 32).shape == (16, 32, 3)


def test_load_portrait_bad_inputs_raise_input_error(tmp_path):
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "good.png")
    Image.fromarray(image).save(tmp_path / "good.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("good.png", "good.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"truncated_{name}").write_bytes(data[: len(data) // 2])
    cases = {
        "missing.png": "not found",
        "empty.png": "empty",
        "text.png": "not an image",
        "truncated_good.png": "truncated",
        "truncated_good.jpg": "truncated",
    }
    for name, problem in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(InputError) as err:
            load_portrait(path, 32, 32)
        assert err.value.source == path and problem in err.value.problem, (name, err.value.problem)


def test_video_writer_with_audio_matches_audio_duration(tmp_path):
    save_wav(tmp_path / "speech.wav", speech_like(SPEECH_SECONDS, 16000), 16000)
    needed = math.ceil(SPEECH_SECONDS * FPS)
    out = tmp_path / "talk.mp4"
    with VideoWriter(out, FPS, 48, 32, audio_path=tmp_path / "speech.wav") as writer:
        for start in range(0, needed + 10, 7):  # 10 frames too many: cut at the audio's end
            writer.write(frames_pattern(7, offset=start))
    info = probe(out)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"], info["fps"]) == (48, 32, FPS)
    assert info["frames"] == needed
    assert info["has_audio"]
    assert abs(info["audio_duration"] - SPEECH_SECONDS) < FRAME_SECONDS
    assert abs(info["duration"] - SPEECH_SECONDS) < FRAME_SECONDS
    assert abs(info["frames"] / FPS - info["audio_duration"]) < FRAME_SECONDS
    assert sorted(os.listdir(tmp_path)) == ["speech.wav", "talk.mp4"]  # no temporary files left


def test_video_writer_audio_longer_than_video_is_trimmed(tmp_path):
    save_wav(tmp_path / "long.wav", speech_like(2.0, 16000), 16000)
    with VideoWriter(tmp_path / "short.mp4", FPS, 48, 32, audio_path=tmp_path / "long.wav") as writer:
        writer.write(frames_pattern(20))
    info = probe(tmp_path / "short.mp4")
    assert info["frames"] == 20
    assert abs(info["audio_duration"] - 20 / FPS) < FRAME_SECONDS


def test_video_writer_round_trip_and_argument_errors(tmp_path):
    frames = frames_pattern(9)
    with VideoWriter(tmp_path / "v.mp4", FPS, 48, 32, crf=10) as writer:
        writer.write(frames[:4])
        writer.write(frames[4])  # a single (H, W, 3) frame
        writer.write(frames[5:])
    decoded, fps = read_video(tmp_path / "v.mp4")
    assert fps == FPS and decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4  # lossy but close
    info = probe(tmp_path / "v.mp4")
    assert not info["has_audio"] and info["audio_duration"] is None and info["frames"] == 9

    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", FPS, 47, 32)
    with VideoWriter(tmp_path / "w.mp4", FPS, 48, 32) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((2, 48, 32, 3), np.uint8))  # height and width swapped
        writer.write(frames)
    with pytest.raises(RuntimeError, match="Boom"):  # an exception inside the block leaves no file
        with VideoWriter(tmp_path / "aborted.mp4", FPS, 48, 32) as writer:
            writer.write(frames)
            raise RuntimeError("Boom")
    assert not any(name.startswith((".aborted", "aborted")) for name in os.listdir(tmp_path))


def test_video_writer_reports_a_killed_encoder_as_such(tmp_path):
    """ffmpeg stopped by a signal, seen in a write or at close, is EncoderKilledError (the render actor encodes
    those frames again) and leaves no file behind."""
    import signal

    frames = frames_pattern(4)
    writer = VideoWriter(tmp_path / "killed.mp4", FPS, 48, 32)
    writer.write(frames)
    writer._proc.send_signal(signal.SIGKILL)
    writer._proc.wait()
    with pytest.raises(EncoderKilledError, match="signal 9"):
        writer.write(frames)
    writer.abort()
    writer = VideoWriter(tmp_path / "killed-at-close.mp4", FPS, 48, 32)
    writer.write(frames)
    writer._proc.send_signal(signal.SIGKILL)
    with pytest.raises(EncoderKilledError):  # killed before close waited for it
        writer.close()
    assert not os.listdir(tmp_path)


def test_concat_mp4_copies_video_exactly_and_muxes_audio(tmp_path):
    segments, lengths = [], [5, 8, 3]
    for i, n in enumerate(lengths):
        path = str(tmp_path / f"seg{i}.mp4")
        with VideoWriter(path, FPS, 48, 32) as writer:
            writer.write(frames_pattern(n, offset=10 * i))
        segments.append(path)
    decoded_segments = np.concatenate([read_video(p)[0] for p in segments])

    concat_mp4(segments, tmp_path / "joined.mp4")
    joined, fps = read_video(tmp_path / "joined.mp4")
    assert fps == FPS and probe(tmp_path / "joined.mp4")["frames"] == sum(lengths)
    np.testing.assert_array_equal(joined, decoded_segments)  # bit-exact: the video was not re-encoded

    total = sum(lengths) / FPS
    save_wav(tmp_path / "speech.wav", speech_like(total + 0.5, 16000), 16000)  # longer: trimmed
    concat_mp4(segments, tmp_path / "joined_audio.mp4", audio_path=str(tmp_path / "speech.wav"))
    info = probe(tmp_path / "joined_audio.mp4")
    assert info["frames"] == sum(lengths) and abs(info["audio_duration"] - total) < FRAME_SECONDS
    np.testing.assert_array_equal(read_video(tmp_path / "joined_audio.mp4")[0], decoded_segments)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # temp files gone

    # A last segment of one frame (a render's 100 frames in blocks of 99): the joined stream lasts longer than its
    # frames, and ffmpeg's average rate reads 24.51; the frame rate is still the frames' own (the metrics time the
    # speech by it).
    segments = []
    for i, n in enumerate([99, 1]):
        segments.append(str(tmp_path / f"last{i}.mp4"))
        with VideoWriter(segments[-1], FPS, 48, 32) as writer:
            writer.write(frames_pattern(n))
    save_wav(tmp_path / "speech4.wav", speech_like(100 / FPS, 16000), 16000)
    concat_mp4(segments, tmp_path / "short_last.mp4", audio_path=str(tmp_path / "speech4.wav"))
    assert probe(tmp_path / "short_last.mp4")["fps"] == stream_video(tmp_path / "short_last.mp4").fps == FPS


def test_frame_rate_is_the_base_rate_unless_the_average_is_far_from_it():
    from model.media.video import _frame_rate

    assert _frame_rate("h264, yuv420p, 128x128, 41 kb/s, 24.51 fps, 25 tbr, 12800 tbn") == 25.0  # a joined mp4
    assert _frame_rate("h264, yuv420p, 1080x1920, 29.92 fps, 120 tbr, 90k tbn") == 29.92  # a phone's variable rate
    assert _frame_rate("h264, 30 tbr, 90k tbn") == 30.0 and _frame_rate("rawvideo, 64x64") is None


def test_key_frames_are_read_from_a_file_or_a_presigned_url_as_an_mp4_only(tmp_path, s3_server, s3_bucket):
    from model.media.video import read_key_frames
    from pipeline.storage import ObjectStore

    frames = frames_pattern(50)  # 2 s
    with VideoWriter(tmp_path / "v.mp4", FPS, 48, 32, crf=10) as writer:
        writer.write(frames)
    local = read_key_frames(str(tmp_path / "v.mp4"), 1.0, 16)
    assert [f.shape for f in local] == [(16, 24, 3)] * 3
    for got, want in zip(local, (frames[0], frames[25], frames[49])):  # first, middle, last
        small = np.asarray(Image.fromarray(want).resize((24, 16), Image.BILINEAR))
        assert np.abs(got.astype(int) - small).mean() < 12
    store = ObjectStore(s3_server)
    store.put_file(f"{s3_bucket}/out/v.mp4", tmp_path / "v.mp4")
    remote = read_key_frames(store.presigned_url(f"{s3_bucket}/out/v.mp4"), 1.0, 16)
    assert all(np.array_equal(a, b) for a, b in zip(local, remote))
    # Anything but an mp4 is refused, a playlist that would make ffmpeg read other files among them.
    (tmp_path / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{tmp_path / 'v.mp4'}\n")
    save_wav(tmp_path / "speech.wav", speech_like(0.5, 16000), 16000)
    for source in ("list.m3u8", "speech.wav"):
        with pytest.raises(InputError, match="cannot read video"):
            read_key_frames(str(tmp_path / source), 0.1, 16)
