"""ObjectStore against the real filesystem and a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

from pipeline.settings import MIB, StorageSettings
from pipeline.storage import ObjectStore
from pipeline.uri import confined_uri, normalize_uri, safe_name


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    """(store, root URI) for each backend."""
    if request.param == "file":
        return ObjectStore(), normalize_uri(str(tmp_path / "store"))
    settings = request.getfixturevalue("s3_server")
    return ObjectStore(settings), request.getfixturevalue("s3_bucket") + "/prefix"


def test_round_trip_list_delete(root, tmp_path):
    store, base = root
    store.put_bytes(f"{base}/a/one.bin", b"1")
    src = tmp_path / "two.bin"
    src.write_bytes(b"22")
    store.put_file(f"{base}/a/b/two.bin", src)
    assert store.get_bytes(f"{base}/a/one.bin") == b"1"
    store.get_file(f"{base}/a/b/two.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"22"
    assert store.exists(f"{base}/a/one.bin") and not store.exists(f"{base}/a/missing")
    assert store.list(f"{base}/a") == [f"{base}/a/b/two.bin", f"{base}/a/one.bin"]
    with pytest.raises(FileNotFoundError, match="missing"):
        store.get_bytes(f"{base}/missing")
    store.delete(f"{base}/a/one.bin")
    store.delete(f"{base}/a/one.bin")  # deleting twice is not an error
    assert store.list(f"{base}/a") == [f"{base}/a/b/two.bin"]
    store.delete_prefix(f"{base}/a")
    assert store.list(f"{base}/a") == []


def test_object_never_visible_before_complete(root, tmp_path):
    """Mid-upload (after bytes went out) the target does not exist; a failed upload leaves nothing."""
    store, base = root
    if base.startswith("s3://"):
        store = ObjectStore(
            store.settings.model_copy(update={"multipart_threshold": 5 * MIB, "multipart_chunk_size": 5 * MIB})
        )
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MIB))  # 3 parts on S3
    seen_during_upload = []

    def check(_bytes: int) -> None:
        seen_during_upload.append(store.exists(f"{base}/big.bin"))

    store.put_file(f"{base}/big.bin", src, progress=check)
    assert seen_during_upload and not any(seen_during_upload)
    assert store.get_bytes(f"{base}/big.bin") == src.read_bytes()

    def fail(_bytes: int) -> None:
        raise OSError("connection lost")

    with pytest.raises(OSError, match="connection lost"):
        store.put_file(f"{base}/broken.bin", src, progress=fail)
    assert not store.exists(f"{base}/broken.bin")
    assert store.list(base) == [f"{base}/big.bin"]  # no temporary files left behind


def test_s3_multipart_above_threshold(s3_server, s3_bucket, s3_raw, tmp_path):
    small_parts = s3_server.model_copy(update={"multipart_threshold": 5 * MIB, "multipart_chunk_size": 5 * MIB})
    store = ObjectStore(small_parts)
    src = tmp_path / "video.mp4"
    src.write_bytes(os.urandom(11 * MIB))
    store.put_file(f"{s3_bucket}/out/video.mp4", src)
    store.put_bytes(f"{s3_bucket}/out/small.json", b"{}")
    bucket = s3_bucket[len("s3://") :]
    # S3 gives a multipart object an ETag "<md5 of part md5s>-<parts>", a single PUT a plain md5.
    assert s3_raw.head_object(Bucket=bucket, Key="out/video.mp4")["ETag"].strip('"').endswith("-3")
    assert "-" not in s3_raw.head_object(Bucket=bucket, Key="out/small.json")["ETag"]
    assert s3_raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.get_bytes(f"{s3_bucket}/out/video.mp4") == src.read_bytes()


def test_s3_client_uses_settings(s3_server):
    settings = s3_server.model_copy(update={"max_attempts": 7})
    client = ObjectStore(settings)._s3()
    assert client.meta.endpoint_url == settings.endpoint_url
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.retries == {"total_max_attempts": 7, "mode": "standard"}


def test_store_pickles_without_its_client(s3_server):
    import pickle

    store = ObjectStore(s3_server)
    store._s3()
    clone = pickle.loads(pickle.dumps(store))
    assert clone.settings == s3_server and clone._s3_client is None


def test_names_from_request_data_cannot_escape():
    for hostile in ("../../etc/passwd", "/abs", "a/b", "..", ".", "", "x\\y", "s3://other/bucket"):
        name = safe_name(hostile)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name
    assert safe_name("clip_01.v2") == "clip_01.v2"
    assert safe_name("a/b") != safe_name("a_b")
    root = "file:///out"
    assert confined_uri(root, "sub/x.mp4") == "file:///out/sub/x.mp4"
    for hostile in ("../x.mp4", "/etc/x.mp4", "a/../../x.mp4", "s3://b/x.mp4", "a//x.mp4"):
        with pytest.raises(ValueError):
            confined_uri(root, hostile)


def test_uri_normalisation(tmp_path):
    assert normalize_uri(str(tmp_path)) == f"file://{tmp_path}"
    assert normalize_uri(f"file://{tmp_path}/a/../b") == f"file://{tmp_path}/b"
    assert normalize_uri("x.png", base=f"file://{tmp_path}") == f"file://{tmp_path}/x.png"
    assert normalize_uri("in/x.png", base="s3://bucket/jobs") == "s3://bucket/jobs/in/x.png"
    assert normalize_uri("s3://bucket//a/./b") == "s3://bucket/a/b"
    with pytest.raises(ValueError, match="scheme"):
        normalize_uri("http://example.com/x.png")
    assert StorageSettings().multipart_chunk_size >= 5 * MIB


def test_s3_outage_mid_upload_is_retried_and_never_shows_a_partial_object(tmp_path):
    """The S3 endpoint goes down for 3 s while a multipart upload is under way: the upload starts again
    when it is back and completes; a reader polling the key meanwhile never sees anything but the whole
    object, and no incomplete upload is left behind."""
    import threading
    import time

    from conftest import _free_port, s3_client
    from moto.server import ThreadedMotoServer

    port = _free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    # botocore alone gets 2 tries per request here, far too few for a 3-s outage: the store's own retry
    # (retry_seconds) is what carries the upload through.
    settings = StorageSettings(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="testing",
        secret_access_key="testing",
        multipart_threshold=5 * MIB,
        multipart_chunk_size=5 * MIB,
        max_attempts=2,
        retry_seconds=30,
    )
    raw = s3_client(settings)
    raw.create_bucket(Bucket="outage")
    src = tmp_path / "video.mp4"
    src.write_bytes(os.urandom(16 * MIB))  # 4 parts
    whole = src.read_bytes()

    def outage() -> None:
        servers[0].stop()
        time.sleep(3.0)
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    cut = threading.Thread(target=outage)
    seen: list[int] = []  # sizes of the object a reader found while the upload ran
    uploading = threading.Event()
    uploading.set()

    def reader() -> None:
        watcher = s3_client(settings.model_copy(update={"max_attempts": 1}))
        while uploading.is_set():
            try:
                seen.append(len(watcher.get_object(Bucket="outage", Key="out/video.mp4")["Body"].read()))
            except Exception:  # not there yet, or the endpoint is down
                pass
            time.sleep(0.05)

    cut_started, cut_lock = [], threading.Lock()

    def progress(_bytes: int) -> None:  # called from the upload's worker threads, several at once
        with cut_lock:
            if not cut_started:
                cut_started.append(True)
                cut.start()  # the first bytes are out: take the endpoint down

    watching = threading.Thread(target=reader)
    watching.start()
    try:
        ObjectStore(settings).put_file("s3://outage/out/video.mp4", src, progress=progress)
    finally:
        uploading.clear()
        watching.join()
        if cut_started:
            cut.join()
    try:
        assert len(servers) == 2, "the endpoint never went down"
        assert raw.get_object(Bucket="outage", Key="out/video.mp4")["Body"].read() == whole
        assert all(size == len(whole) for size in seen), seen  # never a partial object
        assert raw.list_multipart_uploads(Bucket="outage").get("Uploads", []) == []
    finally:
        servers[-1].stop()
