"""Speech in and out: decode the documented audio formats to mono float32 at a fixed rate; write 16-bit wav."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import wave

import ffmpeg
import numpy as np

from model.errors import InputError
from model.media._ffmpeg import (
    AUDIO_DEMUXERS,
    AUDIO_FORMATS_TEXT,
    NOT_ON_WHITELIST,
    QUIET,
    FFmpegError,
    check_input_file,
    ffmpeg_exe,
    input_args,
    run_ffmpeg,
    stderr_tail,
)

PCM16_SCALE = 32767.0
BYTES_PER_SAMPLE = 4  # float32
PIPE_CHUNK = 1 << 20

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


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream of `path` to float32 mono in [-1, 1] at `sample_rate` Hz.

    The documented formats (wav, flac, mp3, m4a/aac, ogg/opus) work; stereo is down-mixed, the rate is
    resampled. The decode streams, and with `max_seconds` it stops there: a long file costs at most
    max_seconds of samples, whatever its length or compression ratio.
    Raises InputError (naming the file) for a missing, empty, unsupported, non-audio, corrupt, silent-by-length
    or too long file.
    """
    path = check_input_file(path)
    # rematrix_maxval=1 normalises the down-mix matrix: stereo becomes (L + R) / 2, which cannot clip.
    output = ["-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate), "-rematrix_maxval", "1.0"]
    limit_bytes = None
    if max_seconds is not None:
        output += ["-t", f"{max_seconds + 1:.3f}"]  # ffmpeg stops a little past the limit: enough to tell
        limit_bytes = math.floor(max_seconds * sample_rate) * BYTES_PER_SAMPLE
    output += ["-c:a", "pcm_f32le", "-f", "f32le", "pipe:"]
    pcm = bytearray()
    with (
        tempfile.TemporaryFile() as err,
        subprocess.Popen(
            [ffmpeg_exe(), *QUIET, *input_args(path, AUDIO_DEMUXERS), *output],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        ) as proc,
    ):
        while chunk := proc.stdout.read(PIPE_CHUNK):
            pcm += chunk
            if limit_bytes is not None and len(pcm) > limit_bytes:
                proc.kill()
                raise InputError(path, f"audio lasts longer than the limit of {max_seconds:g} s")
        if proc.wait() != 0:
            err.seek(0)
            raise InputError(path, f"cannot decode audio: {_audio_reason(err.read().decode('utf-8', 'replace'))}")
    samples = np.frombuffer(pcm, dtype=np.float32)
    if samples.size == 0:
        raise InputError(path, "audio has zero length (decodes to 0 samples)")
    return np.clip(samples, -1.0, 1.0, out=samples)


def _audio_reason(stderr: str) -> str:
    if "matches no streams" in stderr:
        return "no audio stream in file"
    if NOT_ON_WHITELIST in stderr:
        return f"not a supported audio format ({AUDIO_FORMATS_TEXT})"
    return stderr_tail(stderr)


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
