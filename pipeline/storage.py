"""One object-store interface over local files (`file://` or a bare path) and S3 (`s3://`, any endpoint).

Every method takes a full URI. Writes are atomic: a local file is written next to its target under a
temporary name and renamed over it; an S3 object (single PUT or completed multipart upload) appears only
when whole. Missing objects raise FileNotFoundError naming the URI, for both backends.

Names derived from request data (row ids, per-row outputs) go through `safe_name` / `confined_uri`, so no
manifest can make the pipeline write outside its output root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO

from pipeline.settings import StorageSettings

COPY_CHUNK = 1024 * 1024  # bytes per read/write when copying local files
S3_DELETE_BATCH = 1000  # DeleteObjects accepts at most this many keys
TEMP_MARK = ".tmp-"  # local temporary files: ".<name>.tmp-<random>", never listed

ProgressCallback = Callable[[int], None]  # called with the bytes transferred since the last call


# ---------------------------------------------------------------- URIs


def normalize_uri(uri: str, base: str | None = None) -> str:
    """`s3://bucket/key` stays; a local path or `file://` URI becomes `file:///absolute/path`.

    A relative path resolves against `base` (a directory URI) when given, else the working directory.
    """
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        return "s3://" + posixpath.normpath(uri[len("s3://") :]).lstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    if not os.path.isabs(uri) and base is not None:
        return join_uri(normalize_uri(base), uri)
    return "file://" + os.path.abspath(uri)


def join_uri(base: str, relative: str) -> str:
    """Join a relative path onto a normalised directory URI (".." allowed: the caller chose the path)."""
    scheme, rest = base.split("://", 1)
    return (
        f"{scheme}://"
        + ("/" if scheme == "file" else "")
        + posixpath.normpath(posixpath.join(rest, relative)).lstrip("/")
    )


def parent_uri(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}"


def safe_name(text: str) -> str:
    """A single path component made from untrusted text (a row id): no separators, no "..", never empty.

    Characters outside [A-Za-z0-9._-] become "_"; when anything changed, a short hash of the original is
    appended so that distinct ids ("a/b", "a_b") never share a name.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    if cleaned != text or not cleaned:
        cleaned = f"{cleaned or 'row'}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return cleaned


def is_under(uri: str, root: str) -> bool:
    return uri.startswith(root.rstrip("/") + "/")


def confined_uri(root: str, relative: str) -> str:
    """`root`/`relative` for a relative path from request data; refuses anything that would leave `root`."""
    parts = relative.replace("\\", "/").split("/")
    if relative.startswith("/") or "://" in relative or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {relative!r} must be relative, without '.', '..' or empty components")
    return root.rstrip("/") + "/" + "/".join(parts)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


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
            self._s3().upload_file(os.fspath(path), bucket, key, Config=self._transfer_config(), Callback=progress)
            return
        with open(path, "rb") as src:
            self._put_stream(uri, src, progress)

    def _put_stream(self, uri: str, src: IO[bytes], progress: ProgressCallback | None) -> None:
        if uri.startswith("s3://"):
            bucket, key = _split_s3(uri)
            self._s3().upload_fileobj(src, bucket, key, Config=self._transfer_config(), Callback=progress)
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

    def get_bytes(self, uri: str) -> bytes:
        uri = normalize_uri(uri)
        if uri.startswith("s3://"):
            bucket, key = _split_s3(uri)
            try:
                return self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
            except self._s3().exceptions.NoSuchKey:
                raise FileNotFoundError(f"{uri}: no such object") from None
        try:
            with open(_local(uri), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{uri}: file not found") from None

    def get_file(self, uri: str, path: str | os.PathLike) -> None:
        """Download to a local path (atomically: a partial download never sits at `path`)."""
        uri, path = normalize_uri(uri), os.fspath(path)
        if not uri.startswith("s3://"):
            if not os.path.isfile(_local(uri)):
                raise FileNotFoundError(f"{uri}: file not found")
            with open(_local(uri), "rb") as src:
                self._put_stream(normalize_uri(path), src, progress=None)
            return
        if not self.exists(uri):
            raise FileNotFoundError(f"{uri}: no such object")
        bucket, key = _split_s3(uri)
        tmp = f"{path}{TEMP_MARK}{os.getpid()}"
        try:
            self._s3().download_file(bucket, key, tmp, Config=self._transfer_config())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    @contextlib.contextmanager
    def local_copy(self, uri: str, suffix: str = "") -> Iterator[str]:
        """A local path holding the object: the file itself for file://, a temporary download for s3://."""
        uri = normalize_uri(uri)
        if not uri.startswith("s3://"):
            path = _local(uri)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{uri}: file not found")
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="avatar-fetch-") as tmp:
            path = os.path.join(tmp, "object" + suffix)
            self.get_file(uri, path)
            yield path

    def exists(self, uri: str) -> bool:
        uri = normalize_uri(uri)
        if uri.startswith("s3://"):
            from botocore.exceptions import ClientError

            bucket, key = _split_s3(uri)
            try:
                self._s3().head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return os.path.isfile(_local(uri))

    def list(self, prefix: str) -> list[str]:
        """URIs of all objects under the directory `prefix`, sorted."""
        prefix = normalize_uri(prefix).rstrip("/") + "/"
        if prefix.startswith("s3://"):
            bucket, key = _split_s3(prefix)
            found = []
            for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                found += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
            return sorted(found)
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
            self._s3().delete_object(Bucket=bucket, Key=key)
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
                self._s3().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
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
                aws_secret_access_key=s.secret_access_key,
                config=Config(retries={"total_max_attempts": s.max_attempts, "mode": "standard"}),
            )
        return self._s3_client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunk_size,
        )


def _local(uri: str) -> str:
    return uri[len("file://") :]
