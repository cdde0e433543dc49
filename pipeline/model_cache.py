"""Checkpoints in object storage: each node downloads one once into a local cache, whatever its actor count.

    path = local_checkpoint("s3://models/livetalk-1.3b", store, cache_root)

A checkpoint directory carries MANIFEST.json (every file, its size and sha256; `avatar-render import` writes it).
The first actor on a node to need it takes a file lock, downloads every listed file into a staging directory,
verifies each sha256, and renames the directory into place; actors that wait on the lock find it there. A corrupt
or partial download never becomes visible: the next try starts again. MANIFEST.json is read bounded
(MAX_CONFIG_BYTES), and an object whose size is not the listed one is refused before it is downloaded. Local paths
and `file://` URIs are used in place (when the model loads, their files must lie inside the directory and match the
manifest's sizes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from model.checkpoint import MANIFEST_FILE, MAX_CONFIG_BYTES, sha256_file
from model.errors import ModelComponentError
from pipeline.storage import ObjectStore
from pipeline.uri import normalize_uri

READY_MARK = ".verified"  # written last in a cache entry: every file is there and matches its sha256


def default_cache_root() -> Path:
    """$AVATAR_RENDER_MODEL_CACHE, else ~/.cache/avatar-render/checkpoints."""
    root = os.environ.get("AVATAR_RENDER_MODEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "avatar-render" / "checkpoints"


def local_checkpoint(uri: str, store: ObjectStore, cache_root: Path | None = None) -> Path:
    """A local directory holding the checkpoint at `uri`: the directory itself when it is local, else this node's
    verified copy (downloaded now if no other process on the node has)."""
    uri = normalize_uri(uri)
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    cache_root = Path(cache_root or default_cache_root())
    cache_root.mkdir(parents=True, exist_ok=True)
    entry = cache_root / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if (entry / READY_MARK).exists():
        return entry
    with open(cache_root / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait here, then find it ready
        if not (entry / READY_MARK).exists():
            _download(uri.rstrip("/"), store, entry)
    return entry


def _download(uri: str, store: ObjectStore, entry: Path) -> None:
    try:
        manifest = json.loads(store.get_bytes(f"{uri}/{MANIFEST_FILE}", max_bytes=MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise ModelComponentError(
            f"{uri}/{MANIFEST_FILE}: missing; upload a checkpoint directory built by `avatar-render import`"
        ) from None
    except ValueError as err:  # over the limit (ObjectTooLarge), or not JSON
        raise ModelComponentError(f"{uri}/{MANIFEST_FILE}: not a checkpoint's manifest ({err})") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name, spec in manifest["files"].items():
            if name.startswith("/") or ".." in Path(name).parts:
                raise ModelComponentError(f"{uri}/{MANIFEST_FILE}: lists a file outside the checkpoint: {name!r}")
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if store.size(f"{uri}/{name}") != spec["bytes"]:  # refused before a byte of it is downloaded
                raise ModelComponentError(
                    f"{uri}/{name}: does not match {MANIFEST_FILE} (size); upload the checkpoint again"
                )
            store.get_file(f"{uri}/{name}", target)
            if target.stat().st_size != spec["bytes"] or sha256_file(target) != spec["sha256"]:
                raise ModelComponentError(
                    f"{uri}/{name}: does not match {MANIFEST_FILE} (size or sha256); upload the checkpoint again"
                )
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        (staging / READY_MARK).write_text("")
        shutil.rmtree(entry, ignore_errors=True)  # an earlier partial entry, never marked ready
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
