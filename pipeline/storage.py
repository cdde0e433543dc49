"""One object-store interface over local files (`file://` or a bare path) and S3 (`s3://`, any endpoint).

Every method takes a full URI and normalises it with `pipeline.uri.normalize_uri` (the tree's one rule).
Writes are atomic: a local file is written next to its target under a temporary name and renamed over it;
an S3 object (single PUT or completed multipart upload) appears only when whole. Missing objects raise
FileNotFoundError naming the URI, for both backends.

Reads are bounded: `get_bytes(max_bytes=)` and `local_copy(max_bytes=)` refuse an object over the limit
(ObjectTooLarge) before reading it whole, and a local read opens the file first and then checks that what
it opened is a regular file (a FIFO or a device never blocks or streams forever).

S3 faults are retried: botocore retries each request (`max_attempts`), and a transfer that still fails on
a connection error or a 5xx is started again from the beginning for up to `retry_seconds`. An upload
retried this way never shows a partial object (S3 publishes a multipart object only when it is complete),
and the incomplete uploads the failed attempts left behind are aborted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO

from pipeline.settings import StorageSettings
from pipeline.uri import normalize_uri

COPY_CHUNK = 1024 * 1024  # bytes per read/write when copying local files
S3_DELETE_BATCH = 1000  # DeleteObjects accepts at most this many keys
TEMP_MARK = ".tmp-"  # local temporary files: ".<name>.tmp-<random>", never listed
RETRY_FIRST_DELAY_S = 0.5  # then doubling, up to RETRY_MAX_DELAY_S, within StorageSettings.retry_seconds
RETRY_MAX_DELAY_S = 8.0

ProgressCallback = Callable[[int], None]  # called with the bytes transferred since the last call


class ObjectTooLarge(ValueError):
    """An object over the size limit a caller set; nothing of it was kept."""

    def __init__(self, uri: str, limit: int):
        super().__init__(f"{uri}: larger than the limit of {limit} bytes")
        self.uri, self.limit = uri, limit


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _local(uri: str) -> str:
    return uri[len("file://") :]


def _open_regular(uri: str) -> tuple[int, os.stat_result]:
    """Open a local object for reading and check what was opened: a regular file (not a FIFO, a device or a
    directory) at the path the URI names (no symbolic link swapped in since it was normalised)."""
    path = _local(uri)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{uri}: file not found") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileNotFoundError(f"{uri}: not a regular file")
        if os.readlink(f"/proc/self/fd/{fd}") != path:
            raise FileNotFoundError(f"{uri}: the path now leads elsewhere (a symbolic link changed)")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _read_at_most(f: IO[bytes], max_bytes: int | None) -> bytes:
    """The rest of `f`, or max_bytes + 1 bytes if it has more (in chunks: never a buffer of the limit's size)."""
    if max_bytes is None:
        return f.read()
    data = bytearray()
    while len(data) <= max_bytes and (chunk := f.read(min(COPY_CHUNK, max_bytes + 1 - len(data)))):
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------- the store


class ObjectStore:
    """Reads and writes objects by URI; picklable (its S3 client is rebuilt lazily in each process)."""

    def __init__(self, settings: StorageSettings | None = None):
        self.settings = settings or StorageSettings()
        self._s3_client = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "_s3_client": None}

    # ---- writes (atomic)

    def put_bytes(self, uri: str, data: bytes) -> None:
        import io

        self._put_stream(normalize_uri(uri), io.BytesIO(data), progress=None)

    def put_file(self, uri: str, path: str | os.PathLike, progress: ProgressCallback | None = None) -> None:
        uri = normalize_uri(uri)
        if uri.startswith("s3://"):
            bucket, key = _split_s3(uri)
            self._upload(
                uri, lambda: self._s3().upload_file(os.fspath(path), bucket, key, **self._transfer_args(progress))
            )
            return
        with open(path, "rb") as src:
            self._put_stream(uri, src, progress)

    def _put_stream(self, uri: str, src: IO[bytes], progress: ProgressCallback | None) -> None:
        if uri.startswith("s3://"):
            bucket, key = _split_s3(uri)

            def upload() -> None:
                src.seek(0)
                self._s3().upload_fileobj(src, bucket, key, **self._transfer_args(progress))

            self._upload(uri, upload)
            return
        target = _local(uri)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}{TEMP_MARK}", dir=os.path.dirname(target))
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
        try:
            with os.fdopen(fd, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    dst.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    # ---- reads

    def get_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object; with `max_bytes`, ObjectTooLarge for a larger one (at most max_bytes + 1 read)."""
        uri = normalize_uri(uri)
        if uri.startswith("s3://"):
            bucket, key = _split_s3(uri)
            extra = {} if max_bytes is None else {"Range": f"bytes=0-{max_bytes}"}

            def get() -> bytes:
                try:
                    return self._s3().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
                except self._s3().exceptions.NoSuchKey:
                    raise FileNotFoundError(f"{uri}: no such object") from None

            data = self._retrying(get)
        else:
            fd, info = _open_regular(uri)
            with os.fdopen(fd, "rb") as f:
                if max_bytes is not None and info.st_size > max_bytes:
                    raise ObjectTooLarge(uri, max_bytes)
                data = _read_at_most(f, max_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(uri, max_bytes)
        return data

    def get_file(self, uri: str, path: str | os.PathLike) -> None:
        """Download to a local path (atomically: a partial download never sits at `path`)."""
        uri, path = normalize_uri(uri), os.fspath(path)
        if not uri.startswith("s3://"):
            fd, _ = _open_regular(uri)
            with os.fdopen(fd, "rb") as src:
                self._put_stream(normalize_uri(path), src, progress=None)
            return
        if not self.exists(uri):
            raise FileNotFoundError(f"{uri}: no such object")
        bucket, key = _split_s3(uri)
        tmp = f"{path}{TEMP_MARK}{os.getpid()}"
        try:
            self._retrying(lambda: self._s3().download_file(bucket, key, tmp, Config=self._transfer_config()))
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    @contextlib.contextmanager
    def local_copy(self, uri: str, suffix: str = "", max_bytes: int | None = None) -> Iterator[str]:
        """A local path holding the object: the file itself for file://, a temporary download for s3://.
        With `max_bytes`, ObjectTooLarge for a larger object, before anything is downloaded."""
        uri = normalize_uri(uri)
        if not uri.startswith("s3://"):
            fd, info = _open_regular(uri)
            os.close(fd)
            if max_bytes is not None and info.st_size > max_bytes:
                raise ObjectTooLarge(uri, max_bytes)
            yield _local(uri)
            return
        if max_bytes is not None and self.size(uri) > max_bytes:
            raise ObjectTooLarge(uri, max_bytes)
        with tempfile.TemporaryDirectory(prefix="avatar-fetch-") as tmp:
            path = os.path.join(tmp, "object" + suffix)
            self.get_file(uri, path)
            if max_bytes is not None and os.path.getsize(path) > max_bytes:  # replaced since the size check
                raise ObjectTooLarge(uri, max_bytes)
            yield path

    def size(self, uri: str) -> int:
        """Bytes of the object; FileNotFoundError if there is none."""
        uri = normalize_uri(uri)
        if not uri.startswith("s3://"):
            fd, info = _open_regular(uri)
            os.close(fd)
            return info.st_size
        head = self._head(uri)
        if head is None:
            raise FileNotFoundError(f"{uri}: no such object")
        return int(head["ContentLength"])

    def exists(self, uri: str) -> bool:
        uri = normalize_uri(uri)
        if uri.startswith("s3://"):
            return self._head(uri) is not None
        return os.path.isfile(_local(uri))

    def _head(self, uri: str) -> dict | None:
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)

        def head() -> dict | None:
            try:
                return self._s3().head_object(Bucket=bucket, Key=key)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._retrying(head)

    def list(self, prefix: str) -> list[str]:
        """URIs of all objects under the directory `prefix`, sorted."""
        prefix = normalize_uri(prefix).rstrip("/") + "/"
        if prefix.startswith("s3://"):
            bucket, key = _split_s3(prefix)

            def listing() -> list[str]:
                found = []
                for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                    found += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
                return found

            return sorted(self._retrying(listing))
        root = _local(prefix)
        found = []
        for dirpath, _, files in os.walk(root):
            found += ["file://" + os.path.join(dirpath, f) for f in files if TEMP_MARK not in f]
        return sorted(found)

    def presigned_url(self, uri: str, expires_s: int = 900) -> str:
        """A time-limited GET URL of an S3 object, for a reader that is not boto3 (ffmpeg, a browser)."""
        uri = normalize_uri(uri)
        if not uri.startswith("s3://"):
            raise ValueError(f"{uri}: only S3 objects have presigned URLs")
        bucket, key = _split_s3(uri)
        return self._s3().generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )

    # ---- deletes (missing objects are not an error)

    def delete(self, uri: str) -> None:
        uri = normalize_uri(uri)
        if uri.startswith("s3://"):
            bucket, key = _split_s3(uri)
            self._retrying(lambda: self._s3().delete_object(Bucket=bucket, Key=key))
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(uri))

    def delete_prefix(self, prefix: str) -> None:
        prefix = normalize_uri(prefix).rstrip("/") + "/"
        if prefix.startswith("s3://"):
            bucket, _ = _split_s3(prefix)
            keys = [_split_s3(u)[1] for u in self.list(prefix)]
            for start in range(0, len(keys), S3_DELETE_BATCH):
                batch = [{"Key": k} for k in keys[start : start + S3_DELETE_BATCH]]
                self._retrying(
                    lambda batch=batch: self._s3().delete_objects(
                        Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                )
            return
        shutil.rmtree(_local(prefix), ignore_errors=True)

    # ---- S3 plumbing

    def _s3(self):
        if self._s3_client is None:
            import boto3
            from botocore.config import Config

            s = self.settings
            self._s3_client = boto3.session.Session().client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
                config=Config(retries={"total_max_attempts": s.max_attempts, "mode": "standard"}),
            )
        return self._s3_client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunk_size,
        )

    def _transfer_args(self, progress: ProgressCallback | None) -> dict:
        return {"Config": self._transfer_config(), "Callback": progress}

    def _retrying(self, operation: Callable):
        """Run `operation`, again after a transient S3 fault, until it succeeds or retry_seconds have passed."""
        deadline = time.monotonic() + self.settings.retry_seconds
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return operation()
            except Exception as err:
                if not _transient(err) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_DELAY_S)

    def _upload(self, uri: str, upload: Callable[[], None]) -> None:
        """An upload, retried; afterwards the incomplete multipart uploads of failed attempts are aborted."""
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            upload()

        self._retrying(attempt)
        if attempts > 1:
            bucket, key = _split_s3(uri)
            with contextlib.suppress(Exception):  # tidying only: the object itself is complete
                listing = self._s3().list_multipart_uploads(Bucket=bucket, Prefix=key)
                for stale in listing.get("Uploads", []):
                    if stale["Key"] == key:
                        self._s3().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=stale["UploadId"])


def _transient(err: BaseException) -> bool:
    """A connection failure or a server-side (5xx / SlowDown) error, also inside boto3's S3UploadFailedError."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(err, S3UploadFailedError):  # raised while handling the ClientError it names
        err = err.__cause__ or err.__context__
    if isinstance(err, EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError | ReadTimeoutError):
        return True
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or err.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    return False
