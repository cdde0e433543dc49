"""Thumbnail strips of rendered videos for the console: the first, middle and last frame side by side, one JPEG per
row, made with the project's ffmpeg on first request and kept on disk.

The cache is bounded: each strip by its height (and a width cap), the directory by `max_bytes`, least recently
used first out. Making strips is bounded too: `concurrency` ffmpeg runs at once on the cache's own threads, so a
page of a hundred rows cannot start a hundred decoders; requests waiting for a turn hold no thread (they await),
so viewers cannot starve the thread pool the service's other routes share, and past `max_waiting` of them
`strip` raises `ThumbnailsBusy` instead of queueing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from model.media.video import read_key_frames
from pipeline.events import RowResult
from pipeline.storage import ObjectStore

MAX_ASPECT = 8  # a strip is at most this many times as wide as it is high (three frames of 16:9 are 5.3)
JPEG_QUALITY = 80


class ThumbnailsBusy(Exception):
    """`max_waiting` strips are already waiting to be made: ask again later."""


class ThumbnailCache:
    def __init__(
        self,
        directory: Path,
        store: ObjectStore,
        *,
        height: int,
        max_bytes: int,
        concurrency: int = 2,
        max_waiting: int = 64,
    ):
        self.directory = directory
        self.store = store
        self.height = height
        self.max_bytes = max_bytes
        self._makers = ThreadPoolExecutor(concurrency, thread_name_prefix="thumbnails")
        self._queued = threading.BoundedSemaphore(concurrency + max_waiting)  # strips being made or waiting
        self._evicting = threading.Lock()

    async def strip(self, job_id: str, row: RowResult, output_uri: str) -> bytes:
        """The JPEG strip of `row`'s video at `output_uri` (normalised, already confined by the caller): from the
        cache (a small file read on the event loop), else made on one of the cache's threads while this awaits.
        Raises ThumbnailsBusy, or what making it raised (OSError, ValueError, the store's errors)."""
        path = self._path(job_id, row, output_uri)
        cached = self._read(path)
        if cached is not None:
            return cached
        if not self._queued.acquire(blocking=False):
            raise ThumbnailsBusy
        try:
            return await asyncio.wrap_future(self._makers.submit(self.strip_sync, job_id, row, output_uri))
        finally:
            self._queued.release()

    def strip_sync(self, job_id: str, row: RowResult, output_uri: str) -> bytes:
        """`strip` in the calling thread: from the cache or made there."""
        path = self._path(job_id, row, output_uri)
        cached = self._read(path)  # made by an earlier request while this one waited
        if cached is not None:
            return cached
        data = self._make(row, output_uri)
        if self.max_bytes > 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self._evict()
        return data

    def close(self) -> None:
        """Stop taking strips; the ones being made finish on their threads."""
        self._makers.shutdown(wait=False, cancel_futures=True)

    def _path(self, job_id: str, row: RowResult, output_uri: str) -> Path:
        key = hashlib.sha256("\0".join((job_id, row.id, output_uri, str(self.height))).encode()).hexdigest()
        return self.directory / f"{key}.jpg"

    def _make(self, row: RowResult, output_uri: str) -> bytes:
        if output_uri.startswith("s3://"):
            source = self.store.presigned_url(output_uri, expires_s=300)
        else:
            source = output_uri.removeprefix("file://")
        frames = read_key_frames(source, row.video_seconds / 2, self.height)
        strip = Image.fromarray(np.concatenate(frames, axis=1))
        if strip.width > MAX_ASPECT * strip.height:
            strip = strip.resize((MAX_ASPECT * strip.height, strip.height))
        out = io.BytesIO()
        strip.save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # recently used: evicted last
        return data

    def _evict(self) -> None:
        """Delete the least recently used strips until the directory is within max_bytes."""
        with self._evicting:
            entries = []
            for entry in os.scandir(self.directory):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                total -= size

    def size_bytes(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(entry.stat().st_size for entry in os.scandir(self.directory))
