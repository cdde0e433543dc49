"""Storage URIs: the one normaliser of the tree, and confinement to roots built on it.

Every URI that names something to read or write goes through `normalize_uri` exactly once before it is
checked, and what it returns is what is read: the service confines it, stores it, and the pipeline reads it
as stored. Its rules, in this order:

- surrounding whitespace is dropped (a CSV's `face.png, speech.wav`); an empty URI, a NUL byte or any
  other control character is refused;
- `s3://bucket/key`: the bucket must be a valid S3 bucket name; `.`/`..` segments and repeated slashes in
  the key collapse (what a relative path from a manifest needs), and a key that would climb above the
  bucket is refused;
- `file:///abs/path` or a bare path: a relative path resolves against `base` (a normalised directory URI)
  or the working directory; local paths are then resolved (symlinks followed, `..` collapsed), so a path
  is compared with a root by where it really leads; `file://host/...` and `file:/x` are refused;
- any other scheme is refused.

`is_under` compares whole path segments (`/data/out2` is not under `/data/out`); `confine` returns the
normalised URI when it lies under one of the roots.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re

SCHEMES = ("file", "s3")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HALF_SCHEME = re.compile(r"^(file|s3):(?!//)", re.IGNORECASE)  # "file:/x", "s3:bucket": a typo, not a path
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rules, minus the IP-address form
MAX_NAME_CHARS = 100  # a name made by safe_name stays well under the 255 bytes filesystems allow


def normalize_uri(uri: str, base: str | None = None) -> str:
    """The canonical form of a storage URI: `s3://bucket/key` or `file:///absolute/resolved/path`.

    Raises ValueError naming the problem for anything that is not a usable file or S3 URI.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise ValueError(f"a URI must be text, got {type(uri).__name__}")
    uri = uri.strip()
    if not uri:
        raise ValueError("empty URI")
    if _CONTROL.search(uri):
        raise ValueError(f"URI contains a control character: {uri!r}")
    if _HALF_SCHEME.match(uri):
        raise ValueError(f"malformed URI {uri!r}; use file:///absolute/path or s3://bucket/key")
    match = _SCHEME.match(uri)
    scheme = match[1].lower() if match else ""
    if scheme == "s3":
        return _normalize_s3(uri[match.end() :], uri)
    if scheme == "file":
        path = uri[match.end() :]
        if not path.startswith("/"):
            raise ValueError(f"file URI with a host or a relative path: {uri!r}; use file:///absolute/path")
    elif scheme:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}; use a local path, file:// or s3://")
    else:
        path = uri
    if not path.startswith("/"):
        base = normalize_uri(base if base is not None else os.getcwd())
        if base.startswith("s3://"):
            return _normalize_s3(posixpath.join(base[len("s3://") :], path), uri)
        path = posixpath.join(base[len("file://") :], path)
    return "file://" + os.path.realpath(path)


def _normalize_s3(rest: str, original: str) -> str:
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"not a valid S3 bucket name {bucket!r} in {original!r}")
    parts: list[str] = []
    for part in key.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError(f"S3 key climbs above the bucket in {original!r}")
            parts.pop()
        else:
            parts.append(part)
    return f"s3://{bucket}/" + "/".join(parts)


def split_path(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path segments) of a normalised URI; for S3 the bucket is the first segment."""
    scheme, rest = uri.split("://", 1)
    return scheme, tuple(p for p in rest.split("/") if p)


def is_under(uri: str, root: str) -> bool:
    """Whether normalised `uri` is `root` or lies inside it, by whole segments."""
    scheme, parts = split_path(uri)
    root_scheme, root_parts = split_path(root)
    return scheme == root_scheme and parts[: len(root_parts)] == root_parts


def confine(uri: str, roots: list[str], base: str | None = None) -> str:
    """The normalised `uri` if it lies under one of `roots` (normalised here too); ValueError otherwise."""
    normalized = normalize_uri(uri, base)
    if not any(is_under(normalized, normalize_uri(root)) for root in roots):
        raise ValueError(f"{uri!r} is not under an allowed root ({', '.join(roots)})")
    return normalized


def parent_uri(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}"


def confined_uri(root: str, relative: str) -> str:
    """`root`/`relative` for a relative path from request data; refuses anything that would leave `root`,
    by its text (no '.', '..', empty or absolute parts) and by where it leads once normalised (a symlink
    inside the root that points out of it)."""
    parts = relative.strip().replace("\\", "/").split("/")
    if relative.strip().startswith("/") or "://" in relative or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {relative!r} must be relative, without '.', '..' or empty components")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValueError(f"path {relative!r} has a component over 255 bytes")
    uri = normalize_uri("/".join(parts), root)
    if not is_under(uri, normalize_uri(root)):
        raise ValueError(f"path {relative!r} leads out of {root} (a symbolic link)")
    return uri


def safe_name(text: str) -> str:
    """A single path component made from untrusted text (a row id): no separators, no "..", never empty,
    at most MAX_NAME_CHARS characters.

    Characters outside [A-Za-z0-9._-] become "_"; when anything changed, a short hash of the original is
    appended so that distinct ids ("a/b", "a_b") never share a name.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")
    if cleaned != text or not cleaned or len(cleaned) > MAX_NAME_CHARS:
        cleaned = f"{cleaned[:MAX_NAME_CHARS] or 'row'}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return cleaned
