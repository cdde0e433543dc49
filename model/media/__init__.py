"""Media I/O through ffmpeg (the imageio-ffmpeg binary) and PIL: audio, portraits, video.

Inputs are confined: ffmpeg opens local files only, through an allow-list of demuxers (no playlists or
other formats that read further files), and PIL only the documented image formats; each decode is bounded
(audio by seconds, portraits by pixels, checked before decoding; video is streamed)."""

from model.media.audio import encode_audio, load_audio, save_wav
from model.media.image import load_portrait
from model.media.video import (
    EncoderKilledError,
    VideoWriter,
    concat_mp4,
    measure_audio_duration,
    probe,
    read_video,
    stream_video,
)

__all__ = [
    "load_audio",
    "save_wav",
    "encode_audio",
    "load_portrait",
    "VideoWriter",
    "EncoderKilledError",
    "read_video",
    "stream_video",
    "probe",
    "concat_mp4",
    "measure_audio_duration",
]
