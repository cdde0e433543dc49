"""Speech in and out: decode any audio ffmpeg reads to mono float32 at a fixed rate; write 16-bit wav."""

from __future__ import annotations

import os
import wave

import ffmpeg
import numpy as np

from model.errors import InputError
from model.media._ffmpeg import FFmpegError, check_input_file, run_ffmpeg

PCM16_SCALE = 32767.0

# Audio codec and muxer implied by an output file's extension.
_AUDIO_FORMATS: dict[str, dict[str, str]] = {
    ".wav": {"acodec": "pcm_s16le", "format": "wav"},
    ".flac": {"acodec": "flac", "format": "flac"},
    ".mp3": {"acodec": "libmp3lame", "format": "mp3"},
    ".m4a": {"acodec": "aac", "format": "ipod"},
    ".aac": {"acodec": "aac", "format": "adts"},
    ".ogg": {"acodec": "libvorbis", "format": "ogg"},
    ".opus": {"acodec": "libopus", "format": "opus"},
}


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream of `path` to float32 mono in [-1, 1] at `sample_rate` Hz.

    Any container/codec ffmpeg reads works; stereo is down-mixed, the rate is resampled.
    Raises InputError (naming the file) for a missing, empty, non-audio, corrupt or silent-by-length file.
    """
    path = check_input_file(path)
    # rematrix_maxval=1 normalises the down-mix matrix: stereo becomes (L + R) / 2, which cannot clip.
    stream = ffmpeg.input(path).output(
        "pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate, map="0:a:0", rematrix_maxval=1.0
    )
    try:
        pcm = run_ffmpeg(stream.get_args(), capture_stdout=True)
    except FFmpegError as err:
        reason = err.reason
        if "matches no streams" in err.stderr:
            reason = "no audio stream in file"
        raise InputError(path, f"cannot decode audio: {reason}") from None
    samples = np.frombuffer(pcm, dtype=np.float32)
    if samples.size == 0:
        raise InputError(path, "audio has zero length (decodes to 0 samples)")
    return np.clip(samples, -1.0, 1.0)


def save_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """Write float samples in [-1, 1] (shape (N,) mono or (N, C)) as 16-bit PCM wav."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise ValueError(f"samples must be (N,) or (N, channels), got shape {samples.shape}")
    pcm = np.round(np.clip(samples, -1.0, 1.0) * PCM16_SCALE).astype("<i2")
    with wave.open(os.fspath(path), "wb") as out:
        out.setnchannels(pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.tobytes())


def encode_audio(src_wav: str | os.PathLike, dst_path: str | os.PathLike) -> None:
    """Re-encode an audio file to the format implied by dst's extension (.wav .flac .mp3 .m4a .aac .ogg .opus)."""
    ext = os.path.splitext(os.fspath(dst_path))[1].lower()
    if ext not in _AUDIO_FORMATS:
        raise ValueError(f"unsupported audio extension {ext!r}; choose one of {sorted(_AUDIO_FORMATS)}")
    stream = ffmpeg.input(os.fspath(src_wav)).output(os.fspath(dst_path), map="0:a:0", **_AUDIO_FORMATS[ext])
    try:
        run_ffmpeg(stream.overwrite_output().get_args())
    except FFmpegError as err:
        raise RuntimeError(f"ffmpeg could not encode {src_wav} -> {dst_path}: {err.reason}") from None
