"""Shared helpers for driving the ffmpeg binary shipped in the imageio-ffmpeg wheel."""

from __future__ import annotations

import functools
import os
import re
import subprocess

import imageio_ffmpeg

# Only errors on stderr: its last line is then the reason a command failed.
QUIET = ("-hide_banner", "-nostdin", "-loglevel", "error")

# What ffmpeg may open for an input: only local files, and only these demuxers. Playlists (hls, dash), concat
# lists, image sequences and every other demuxer that reads *other* files or the network are refused, so a
# file inside an input root can never make ffmpeg read outside it. The audio list is the documented formats:
# wav, flac, mp3, m4a/aac (mov, adts), ogg/opus; video is our own mp4 output (mov).
AUDIO_DEMUXERS = ("wav", "flac", "mp3", "mov", "aac", "ogg")
VIDEO_DEMUXERS = ("mov",)
AUDIO_FORMATS_TEXT = "wav, flac, mp3, m4a/aac, ogg/opus"
NOT_ON_WHITELIST = "not on whitelist"  # ffmpeg's complaint when a file is of a demuxer not allowed


WEB_PROTOCOLS = "http,https,tls,tcp"  # what a presigned S3 URL needs, and nothing else


def input_args(path: str | os.PathLike, demuxers: tuple[str, ...], forced_format: str | None = None) -> list[str]:
    """`-i` for a local file (or an http(s) URL: a presigned S3 one), with ffmpeg confined to the file protocol (the
    web protocols for a URL) and the given demuxers."""
    forced = ["-f", forced_format] if forced_format else []
    source = os.fspath(path)
    remote = source.startswith(("http://", "https://"))
    return [
        *("-protocol_whitelist", WEB_PROTOCOLS if remote else "file", "-format_whitelist", ",".join(demuxers)),
        *forced,
        *("-i", source if remote else "file:" + os.path.abspath(source)),
    ]


@functools.cache
def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


class FFmpegError(RuntimeError):
    """ffmpeg exited non-zero; `reason` is the last meaningful line of its stderr."""

    def __init__(self, reason: str, stderr: str):
        self.reason = reason
        self.stderr = stderr
        super().__init__(reason)


def run_ffmpeg(args: list[str], capture_stdout: bool = False) -> bytes:
    """Run ffmpeg with `args` (without the executable), errors only on stderr; return stdout."""
    proc = subprocess.run(
        [ffmpeg_exe(), *QUIET, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")
        raise FFmpegError(stderr_tail(stderr), stderr)
    return proc.stdout or b""


def stderr_tail(stderr: bytes | str | None, max_lines: int = 1) -> str:
    """The last meaningful lines of ffmpeg's stderr (blank lines and progress noise dropped)."""
    if stderr is None:
        return "no output from ffmpeg"
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()]
    # Drop ffmpeg's "[in#0 @ 0x55d1...] " context prefixes: they name memory addresses, not causes.
    lines = [re.sub(r"^(\[[^\]]+ @ 0x[0-9a-f]+\]\s*)+", "", line) for line in lines]
    lines = [line for line in lines if line and not line.startswith(("frame=", "size=", "video:"))]
    # "Conversion failed!" and "Error opening input files" are summaries; the line before says why.
    summaries = ("Conversion failed!", "Error opening input files", "Error opening input file")
    meaningful = [line for line in lines if not line.startswith(summaries)] or lines
    return " | ".join(meaningful[-max_lines:]) if meaningful else "ffmpeg failed without a message"


def check_input_file(path: str | os.PathLike) -> str:
    """Raise InputError for a missing or empty file; return the path as str."""
    from model.errors import InputError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if not os.path.isfile(path):
        raise InputError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise InputError(path, "file is empty (0 bytes)")
    return path
