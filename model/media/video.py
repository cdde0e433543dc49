"""H.264 mp4 video through ffmpeg: a streaming writer, a streaming reader, a prober and a re-encode-free
concatenation.

Every input ffmpeg opens here is confined to local files and to the demuxers it needs (`input_args`): our
own mp4 files, and speech only in the documented audio formats, so that no playlist can make a mux read
other files.

Every file is written to a temporary name in its destination directory and renamed when complete, so a
reader never sees a half-written mp4. Audio is muxed as AAC in a second, video-copying pass. Durations
agree frame-exactly instead of through ffmpeg's approximate -shortest: the writer drops frames past the
audio's end (ceil(audio * fps) frames at most), and the audio is trimmed to the video's duration.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import ffmpeg
import numpy as np

from model.errors import InputError
from model.media._ffmpeg import (
    AUDIO_DEMUXERS,
    AUDIO_FORMATS_TEXT,
    NOT_ON_WHITELIST,
    QUIET,
    VIDEO_DEMUXERS,
    FFmpegError,
    check_input_file,
    ffmpeg_exe,
    input_args,
    run_ffmpeg,
    stderr_tail,
)

AAC_SAMPLE_RATE = 48000  # AAC frames are 1024 samples: ~21 ms at 48 kHz, finer than one video frame at 25 fps
AAC_BITRATE = "128k"
_PIPE_CHUNK = 1 << 20
STREAM_CHUNK_BYTES = 8 << 20  # decoded frames held at once by stream_video
MEDIA_DEMUXERS = tuple(dict.fromkeys(VIDEO_DEMUXERS + AUDIO_DEMUXERS))


# A constant-rate stream's average frame rate may sit this far (relative) below its base rate: a few frames of stream
# duration past the last frame (2 % for 100 frames with 2 extra).
CFR_RATE_TOLERANCE = 0.05


def _temp_path_beside(path: str) -> str:
    """A fresh temporary .mp4 name in the directory of `path` (so os.replace is an atomic rename)."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part.mp4", dir=directory)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a finished video is an ordinary readable file
    os.close(fd)
    return tmp


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def measure_audio_duration(path: str | os.PathLike) -> float:
    """Exact duration in seconds of the first audio stream, by decoding it (streamed: memory stays bounded)."""
    path = check_input_file(path)
    bytes_per_sample = 2  # s16le mono
    args = [*input_args(path, MEDIA_DEMUXERS), "-map", "0:a:0", "-ac", "1", "-ar", str(AAC_SAMPLE_RATE)]
    args += ["-f", "s16le", "pipe:"]
    with (
        tempfile.TemporaryFile() as err,
        subprocess.Popen(
            [ffmpeg_exe(), *QUIET, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        ) as proc,
    ):
        total = 0
        while chunk := proc.stdout.read(_PIPE_CHUNK):
            total += len(chunk)
        if proc.wait() != 0:
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
            reason = f"not a supported audio format ({AUDIO_FORMATS_TEXT})" if NOT_ON_WHITELIST in stderr else None
            raise InputError(path, f"cannot decode audio: {reason or stderr_tail(stderr)}")
    return total / bytes_per_sample / AAC_SAMPLE_RATE


def _mux_reason(err: FFmpegError) -> str:
    if NOT_ON_WHITELIST in err.stderr:  # our own video inputs are mp4: it is the speech track
        return f"the audio is not a supported audio format ({AUDIO_FORMATS_TEXT})"
    return err.reason


def _mux_args(video_input: list[str], audio_path: str | None, audio_seconds: float | None, out: str) -> list[str]:
    """ffmpeg args copying the first input's video and (optionally) the first `audio_seconds` of audio as AAC.
    The audio is opened like any speech input: local file, documented formats only.

    The video is copied whole: cutting H.264 with B-frames by stream copy is not frame-exact, so callers
    make the video the right length and only the (decoded, sample-exact) audio is trimmed.
    """
    args = [*video_input]
    if audio_path is not None:
        trim = [] if audio_seconds is None else ["-t", f"{audio_seconds:.6f}"]
        args += [*trim, *input_args(audio_path, AUDIO_DEMUXERS), "-map", "0:v:0", "-map", "1:a:0"]
        args += ["-c:a", "aac", "-b:a", AAC_BITRATE, "-ar", str(AAC_SAMPLE_RATE)]
    else:
        args += ["-map", "0:v:0"]
    return args + ["-c:v", "copy", "-movflags", "+faststart", "-f", "mp4", "-y", out]


class EncoderKilledError(RuntimeError):
    """ffmpeg died of a signal (the OOM killer's or a Ray worker's SIGKILL: a worker kills its children before it
    exits), not of anything in its input: the same frames can be encoded again. Any uncaught signal counts, a crash
    too, so callers cap their retries; SIGTERM and SIGINT are not among them (ffmpeg catches both, exits 255)."""


class VideoWriter:
    """Stream uint8 RGB frames into an H.264 (yuv420p, +faststart) mp4, optionally muxing an audio track.

    with VideoWriter("out.mp4", fps=25, width=64, height=64, audio_path="speech.wav") as w:
        w.write(frames)  # (N, H, W, 3) uint8, any number of calls
    Frames go straight to ffmpeg's stdin, so memory does not grow with the video's length.
    With audio, frames past ceil(audio_duration * fps) are dropped and the audio is cut at the video's end,
    so both durations agree within one frame. `audio_duration` (s) saves decoding the audio to measure it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int,
        width: int,
        height: int,
        audio_path: str | os.PathLike | None = None,
        crf: int = 18,
        preset: str = "medium",
        audio_duration: float | None = None,
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs positive even width and height, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = os.fspath(path)
        self.fps, self.width, self.height = fps, width, height
        self.audio_path = None if audio_path is None else check_input_file(audio_path)
        self.max_frames: int | None = None
        if self.audio_path is not None:
            if audio_duration is None:
                audio_duration = measure_audio_duration(self.audio_path)
            self.max_frames = max(1, math.ceil(audio_duration * fps - 1e-9))
        self.frames_written = 0
        self._video_tmp = _temp_path_beside(self.path)
        self._stderr = tempfile.TemporaryFile()
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        stream = stream.output(
            self._video_tmp,
            format="mp4",
            vcodec="libx264",
            pix_fmt="yuv420p",
            crf=crf,
            preset=preset,
            movflags="+faststart",
        ).overwrite_output()
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [ffmpeg_exe(), *QUIET, *stream.get_args()],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def _stderr_tail(self, lines: int = 3) -> str:
        self._stderr.seek(0)
        return stderr_tail(self._stderr.read(), lines)

    def write(self, frames: np.ndarray) -> None:
        """Append frames: uint8 (N, H, W, 3) or one frame (H, W, 3)."""
        if self._proc is None:
            raise RuntimeError(f"VideoWriter for {self.path} is closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 (N, {self.height}, {self.width}, 3), got {frames.dtype} {frames.shape}"
            )
        if self.max_frames is not None:  # nothing is shown after the audio ends
            frames = frames[: max(0, self.max_frames - self.frames_written)]
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except BrokenPipeError:
            self._raise_stopped(self._proc.wait(), "stopped while writing")
        self.frames_written += len(frames)

    def _raise_stopped(self, returncode: int, what: str) -> None:
        if returncode < 0:
            raise EncoderKilledError(f"ffmpeg was killed (signal {-returncode}) while encoding {self.path}") from None
        raise RuntimeError(f"ffmpeg {what} {self.path}: {self._stderr_tail()}") from None

    def close(self) -> None:
        """Finish encoding, mux the audio if any, and move the file into place. Raises RuntimeError on failure."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            if (returncode := proc.wait()) != 0:
                self._raise_stopped(returncode, "failed to encode")
            if self.frames_written == 0:
                raise RuntimeError(f"no frames were written to {self.path}")
            if self.audio_path is None:
                os.replace(self._video_tmp, self.path)
                return
            out_tmp = _temp_path_beside(self.path)
            try:
                video_input = input_args(self._video_tmp, VIDEO_DEMUXERS)
                run_ffmpeg(_mux_args(video_input, self.audio_path, self.frames_written / self.fps, out_tmp))
                os.replace(out_tmp, self.path)
            except FFmpegError as err:
                raise RuntimeError(f"ffmpeg failed to mux audio into {self.path}: {_mux_reason(err)}") from None
            finally:
                _remove_quietly(out_tmp)
        finally:
            _remove_quietly(self._video_tmp)
            self._stderr.close()

    def abort(self) -> None:
        """Stop ffmpeg and leave nothing behind (used when the producer failed)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc = None
            self._stderr.close()
        _remove_quietly(self._video_tmp)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _parse_stream_info(path: str) -> dict:
    """Container duration, video size/fps and audio presence from the header `ffmpeg -i` prints."""
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", *input_args(path, MEDIA_DEMUXERS)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    text = proc.stderr.decode("utf-8", "replace")
    if "Stream #" not in text:  # ffmpeg could not open it; without an output it always exits non-zero
        raise InputError(path, f"cannot read media: {stderr_tail(text)}")
    duration = re.search(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)", text)
    video = re.search(r"Stream #\S+.*?: Video: (.*)", text)
    seconds = None if duration is None else int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3])
    info = {
        "duration": seconds,
        "has_audio": re.search(r"Stream #\S+.*?: Audio: ", text) is not None,
        "has_video": video is not None,
        "fps": None,
        "width": None,
        "height": None,
        "video_codec": None,
        "pix_fmt": None,
    }
    if video is not None:
        codec = re.match(r"(\w+)", video[1])
        pix_fmt = re.search(r", (yuv\w+|rgb\w+|gray\w*|nv12)\b", video[1])
        info["video_codec"] = codec[1] if codec else None
        info["pix_fmt"] = pix_fmt[1] if pix_fmt else None
        size = re.search(r"\b(\d{2,5})x(\d{2,5})\b", video[1])
        if size:
            info["width"], info["height"] = int(size[1]), int(size[2])
        info["fps"] = _frame_rate(video[1])
    return info


def _frame_rate(stream_line: str) -> float | None:
    """The frame rate of a video stream from ffmpeg's description of it. Its average (fps, frames over the stream's
    duration) unless that is within CFR_RATE_TOLERANCE of its base rate (tbr, every timestamp a multiple of it), then
    the base rate: a joined mp4 whose last segment is a frame or two long has evenly spaced frames but a longer stream,
    which the average divides by (100 frames at 25 read "24.51 fps, 25 tbr"); a variable-rate video's base rate can be
    far from its real one (a phone's 29.9 fps video reads 120 tbr), and there the average is the better guess."""

    def rate(unit: str) -> float | None:
        found = re.search(rf"([\d.]+)(k?) {unit}\b", stream_line)
        return None if found is None else float(found[1]) * (1000 if found[2] else 1)

    average, base = rate("fps"), rate("tbr")
    if average is None or (base is not None and abs(average - base) <= CFR_RATE_TOLERANCE * base):
        return base
    return average


def count_video_frames(path: str | os.PathLike) -> int:
    """Frames of the first video stream, counted by stream copy (no decoding: fast for long files)."""
    path = os.fspath(path)
    try:
        progress = run_ffmpeg(
            [
                *input_args(path, VIDEO_DEMUXERS),
                "-map",
                "0:v:0",
                "-c",
                "copy",
                "-f",
                "null",
                "-progress",
                "pipe:1",
                "-",
            ],
            capture_stdout=True,
        ).decode()
    except FFmpegError as err:
        raise InputError(path, f"cannot read video: {err.reason}") from None
    counts = re.findall(r"^frame=(\d+)", progress, flags=re.MULTILINE)
    return int(counts[-1]) if counts else 0


def probe(path: str | os.PathLike) -> dict:
    """duration (container, s), fps, frames, width, height, has_audio, audio_duration (s, decoded) or None,
    and video_codec ("h264"), pix_fmt ("yuv420p")."""
    path = check_input_file(path)
    info = _parse_stream_info(path)
    if not info.pop("has_video"):
        raise InputError(path, "no video stream in file")
    info["frames"] = count_video_frames(path)
    info["audio_duration"] = measure_audio_duration(path) if info["has_audio"] else None
    return info


@dataclass(frozen=True)
class VideoStream:
    """The frames of a video file, decoded as they are iterated: uint8 (n, H, W, 3) chunks of `chunk_frames`
    (the last may be shorter). Memory holds one chunk, however long the video; each iteration decodes anew."""

    path: str
    fps: float
    height: int
    width: int
    chunk_frames: int

    def __iter__(self) -> Iterator[np.ndarray]:
        frame_bytes = self.height * self.width * 3
        args = [*input_args(self.path, VIDEO_DEMUXERS), "-map", "0:v:0", "-fps_mode", "passthrough"]
        args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
        with (
            tempfile.TemporaryFile() as err,
            subprocess.Popen(
                [ffmpeg_exe(), *QUIET, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            ) as proc,
        ):
            try:
                while data := proc.stdout.read(self.chunk_frames * frame_bytes):  # blocks for a whole chunk
                    whole = len(data) // frame_bytes
                    if whole:
                        yield np.frombuffer(data, np.uint8, count=whole * frame_bytes).reshape(
                            whole, self.height, self.width, 3
                        )
            finally:
                if proc.poll() is None:  # the consumer stopped early
                    proc.kill()
            if proc.wait() != 0:
                err.seek(0)
                raise InputError(self.path, f"cannot decode video: {stderr_tail(err.read())}")


def stream_video(path: str | os.PathLike, chunk_bytes: int = STREAM_CHUNK_BYTES) -> VideoStream:
    """The first video stream of `path`, to iterate in chunks of at most `chunk_bytes` (one frame at least)."""
    path = check_input_file(path)
    info = _parse_stream_info(path)
    if not info["has_video"] or info["width"] is None:
        raise InputError(path, "no video stream in file")
    height, width = info["height"], info["width"]
    return VideoStream(path, info["fps"], height, width, max(1, chunk_bytes // (height * width * 3)))


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode every frame of the first video stream: (uint8 (N, H, W, 3), fps). Holds the whole video in
    memory: for long videos, iterate `stream_video`."""
    stream = stream_video(path)
    chunks = list(stream)
    frames = np.concatenate(chunks) if chunks else np.zeros((0, stream.height, stream.width, 3), np.uint8)
    return frames, stream.fps


def _concat_list_line(path: str) -> str:
    quoted = os.path.abspath(path).replace("'", "'\\''")  # the concat demuxer's quoting
    return f"file '{quoted}'\n"


def concat_mp4(
    segment_paths: list[str],
    out_path: str | os.PathLike,
    audio_path: str | os.PathLike | None = None,
    audio_duration: float | None = None,
) -> None:
    """Join H.264 mp4 segments (same codec settings) into out_path without re-encoding the video.

    With audio_path, its audio is muxed as AAC, cut at the video's end (audio shorter than the video simply
    ends early: the copied video is never cut). audio_duration (s), when known, is an upper bound that
    spares ffmpeg reading past it. out_path appears atomically.
    """
    if not segment_paths:
        raise ValueError("concat_mp4 needs at least one segment")
    segments = [check_input_file(p) for p in segment_paths]
    out_path = os.fspath(out_path)
    fps = _parse_stream_info(segments[0])["fps"]
    total_frames = sum(count_video_frames(p) for p in segments)
    audio_seconds = None
    if audio_path is not None:
        audio_path = check_input_file(audio_path)
        audio_seconds = total_frames / fps
        if audio_duration is not None:
            audio_seconds = min(audio_seconds, audio_duration)
    out_tmp = _temp_path_beside(out_path)
    list_path = out_tmp + ".txt"
    try:
        Path(list_path).write_text("".join(_concat_list_line(p) for p in segments))
        # The list is ours (absolute segment paths): the concat demuxer, then mp4 segments only.
        video_input = ["-safe", "0", *input_args(list_path, ("concat", *VIDEO_DEMUXERS), forced_format="concat")]
        run_ffmpeg(_mux_args(video_input, audio_path, audio_seconds, out_tmp))
        os.replace(out_tmp, out_path)
    except FFmpegError as err:
        raise RuntimeError(f"ffmpeg failed to concatenate into {out_path}: {_mux_reason(err)}") from None
    finally:
        _remove_quietly(out_tmp)
        _remove_quietly(list_path)


def read_key_frames(source: str, middle_s: float, height: int) -> list[np.ndarray]:
    """The first frame, the frame at `middle_s` and the last frame of an mp4, scaled to `height` rows (the width
    keeps the aspect ratio): uint8 (height, W, 3) each. `source` is a local path or an http(s) URL (a presigned
    S3 one); ffmpeg seeks in it, so a two-hour video costs what a short one does. Only the mp4 demuxer and, for
    a URL, only the web protocols are allowed (`input_args`): the source is read as a video and nothing else."""
    from PIL import Image

    remote = source.startswith(("http://", "https://"))
    if not remote:
        source = check_input_file(source)
    scale = ["-map", "0:v:0", "-vf", f"scale=-2:{int(height)}", "-c:v", "png"]
    seeks = [["-ss", "0"], ["-ss", f"{max(0.0, middle_s):.3f}"], ["-sseof", "-1"]]  # last: decode the final second
    frames = []
    with tempfile.TemporaryDirectory(prefix="avatar-frames-") as tmp:
        for i, seek in enumerate(seeks):
            out = os.path.join(tmp, f"{i}.png")
            # -update 1: each decoded frame overwrites the file, so it ends holding the last one asked for.
            last = [] if i == 2 else ["-frames:v", "1"]
            try:
                run_ffmpeg([*seek, *input_args(source, VIDEO_DEMUXERS), *scale, *last, "-update", "1", "-y", out])
            except FFmpegError as err:
                raise InputError(source if not remote else "video URL", f"cannot read video: {err.reason}") from None
            if not os.path.exists(out):
                raise InputError(source if not remote else "video URL", "no video frame at the requested time")
            with Image.open(out) as image:
                frames.append(np.asarray(image.convert("RGB")))
    return frames
