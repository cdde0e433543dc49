"""Confine URIs from requests to configured roots, so a request can never name an arbitrary place to write.

Local paths are resolved (symlinks followed, `..` collapsed) before they are compared; `s3://` keys may not
contain `.` or `..` segments. Comparison is by whole path segments, so `/data/out2` is not under `/data/out`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

LOCAL_SCHEMES = ("", "file")


def normalize_uri(uri: str) -> str:
    """A canonical form of a storage URI: `file:///abs/path` for local paths (relative ones against the working
    directory, symlinks resolved), `s3://bucket/key` for S3.

    Raises ValueError for an empty URI, an unsupported scheme, or an S3 key with `.`/`..` segments.
    """
    uri = uri.strip()
    if not uri or "\x00" in uri:
        raise ValueError("empty URI" if not uri else "URI contains a NUL byte")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter is not a scheme; treat as a local path
        scheme = ""
    if scheme in LOCAL_SCHEMES:
        # Same text convention as pipeline.storage: `file://` + the path as is (no percent-encoding).
        path = uri[len("file://") :] if scheme == "file" else uri
        if scheme == "file" and not path.startswith("/"):
            raise ValueError(f"file URI with a host or a relative path: {uri!r}")
        return "file://" + str(Path(path).resolve())
    if scheme == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise ValueError("s3 URI without a bucket")
        parts = [p for p in parsed.path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError("s3 key with '.' or '..' segments")
        return f"s3://{bucket}/" + "/".join(parts)
    raise ValueError(f"unsupported URI scheme {scheme!r} (use a local path, file:// or s3://)")


def is_under(uri: str, root: str) -> bool:
    """Whether `uri` is `root` or lies inside it (both normalized)."""
    target, base = normalize_uri(uri), normalize_uri(root)
    if target.split("://", 1)[0] != base.split("://", 1)[0]:
        return False
    scheme, target_path = target.split("://", 1)
    base_path = base.split("://", 1)[1]
    target_parts = PurePosixPath(target_path).parts
    base_parts = PurePosixPath(base_path).parts
    return target_parts[: len(base_parts)] == base_parts


def confine(uri: str, roots: list[str]) -> str:
    """The normalized `uri` if it lies under one of `roots`; ValueError otherwise."""
    normalized = normalize_uri(uri)
    if not any(is_under(normalized, root) for root in roots):
        raise ValueError(f"{uri!r} is not under an allowed root ({', '.join(roots)})")
    return normalized
