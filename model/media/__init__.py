"""Media I/O through ffmpeg (the imageio-ffmpeg binary) and PIL: audio, portraits, video."""

from model.media.audio import encode_audio, load_audio, save_wav
from model.media.image import load_portrait
from model.media.video import VideoWriter, concat_mp4, measure_audio_duration, probe, read_video

__all__ = [
    "load_audio",
    "save_wav",
    "encode_audio",
    "load_portrait",
    "VideoWriter",
    "read_video",
    "probe",
    "concat_mp4",
    "measure_audio_duration",
]
