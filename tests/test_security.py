"""The service and the pipeline as an attacker or a careless user would try them: escapes from the input
roots, inputs built to exhaust memory, and API values built to break it (docs/security.md lists each
rule with the test that holds it). Rendering is switched off (`run_jobs=False`) unless a test needs it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deploy.app import create_app
from deploy.settings import ServiceSettings
from model.config import get_preset
from model.errors import InputError
from model.media import concat_mp4, load_audio, load_portrait, save_wav
from model.media.video import VideoWriter
from pipeline.manifest import validate_rows
from pipeline.settings import LimitSettings, PipelineSettings, StorageSettings
from pipeline.uri import confine, normalize_uri

REPO = Path(__file__).resolve().parents[1]
BUNDLED_CONFIG = REPO / "model" / "weights" / "tiny" / "config.json"


def make_settings(tmp_path, **overrides) -> ServiceSettings:
    return ServiceSettings(state_dir=tmp_path / "state", **overrides)


def media(directory: Path, seconds: float = 1.0) -> dict:
    """A valid portrait and speech track in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "face.png")
    t = np.arange(int(seconds * 16000)) / 16000
    save_wav(directory / "speech.wav", 0.3 * np.sin(2 * np.pi * 180 * t), 16000)
    return {"portrait": str(directory / "face.png"), "audio": str(directory / "speech.wav")}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- one normaliser ------------------------------------------------------------------------------------------


def test_one_normaliser_for_every_uri(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert normalize_uri(f"  {tmp_path}/link/a/../b.png \n") == f"file://{tmp_path}/real/b.png"
    assert normalize_uri("x.png", base=f"file://{tmp_path}") == f"file://{tmp_path}/x.png"
    assert normalize_uri(" /abs/x.png", base="s3://bucket/jobs") == "file:///abs/x.png"  # never the base's
    assert normalize_uri("../in/x.png", base="s3://bucket/jobs") == "s3://bucket/in/x.png"
    assert normalize_uri("S3://bucket//a/./b/") == "s3://bucket/a/b"
    for bad in (
        "",
        "   ",
        "/a\x00b",
        "/a\nb",
        "http://host/x",
        "file://host/etc/passwd",
        "file:relative",
        "s3://",
        "s3:///key",
        "s3://../key",
        "s3://bucket/a/../../b",
    ):
        with pytest.raises(ValueError):
            normalize_uri(bad)
    assert confine(f" {tmp_path}/real/x ", [str(tmp_path / "real")]) == f"file://{tmp_path}/real/x"
    for outside in (f"{tmp_path}/real2/x", f"{tmp_path}/real/../x", "s3://real/x"):
        with pytest.raises(ValueError, match="not under an allowed root"):
            confine(outside, [str(tmp_path / "real")])
    from deploy import jobs
    from pipeline import manifest, storage

    # Confinement and storage use this one function: the second copy that deploy/ had is gone.
    assert jobs.normalize_uri is manifest.normalize_uri is storage.normalize_uri is normalize_uri
    assert not (REPO / "deploy" / "confine.py").exists()


# -- 1. whitespace ---------------------------------------------------------------------------------------------


def test_whitespace_around_a_path_cannot_walk_out_of_the_input_root(tmp_path):
    inputs, outside = tmp_path / "inputs", media(tmp_path / "outside")
    good = media(inputs)
    manifest = write_jsonl(
        inputs / "job.jsonl", [{"id": "a", "portrait": good["portrait"], "audio": f" {outside['audio']}"}]
    )
    with TestClient(
        create_app(make_settings(tmp_path, input_roots=[str(inputs)]), run_jobs=False), base_url="http://127.0.0.1"
    ) as c:
        response = c.post("/v1/jobs", json={"manifest": manifest})
        assert response.status_code == 422 and response.json()["field"] == "manifest.rows.0.audio", response.json()
        rows = [{"id": "a", "portrait": f"\t{outside['portrait']} ", "audio": good["audio"]}]
        response = c.post("/v1/jobs", json={"rows": rows})
        assert response.status_code == 422 and response.json()["field"] == "rows.0.portrait"
        assert c.get("/v1/jobs").json()["jobs"] == []
    # The row the pipeline would read is the one the check saw: the stripped, absolute path.
    (task,) = validate_rows(
        [{"id": "a", "portrait": " /p.png", "audio": "a.wav "}],
        output_root="file:///out",
        base_uri=f"file://{inputs}",
        limits=LimitSettings(),
        preset=get_preset("tiny"),
    )
    assert task.portrait == "file:///p.png" and task.audio == f"file://{inputs}/a.wav"


def test_whitespace_cannot_turn_an_s3_row_into_a_local_file(tmp_path, s3_server, s3_bucket):
    from pipeline.storage import ObjectStore

    store = ObjectStore(s3_server)
    rows = [{"id": "a", "portrait": "face.png", "audio": " /etc/hostname"}]
    store.put_bytes(f"{s3_bucket}/in/job.jsonl", json.dumps(rows[0]).encode())
    pipeline = PipelineSettings(storage=s3_server)
    settings = make_settings(tmp_path, input_roots=[f"{s3_bucket}/in"], pipeline=pipeline)
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        response = c.post("/v1/jobs", json={"manifest": f"{s3_bucket}/in/job.jsonl"})
        assert response.status_code == 422 and response.json()["field"] == "manifest.rows.0.audio"
        assert "/etc/hostname" in response.json()["error"]


# -- 2. check-then-use -----------------------------------------------------------------------------------------


def wait_until_finished(client, job_id: str) -> dict:
    deadline = time.monotonic() + 240
    while (status := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def test_a_manifest_rewritten_after_the_202_renders_nothing_it_names(ray_cluster, tmp_path):
    """The job runs the rows checked at submission, also after a restart: rewriting the file in between (to
    media outside the root, and more rows than allowed) changes nothing."""
    inputs, outside = tmp_path / "inputs", media(tmp_path / "outside")
    good = media(inputs)
    manifest = inputs / "job.jsonl"
    write_jsonl(manifest, [{"id": "checked", **good}])
    pipeline = PipelineSettings(segment_blocks=4)
    settings = make_settings(tmp_path, input_roots=[str(inputs)], max_rows_per_job=2, pipeline=pipeline)
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:  # accepted, not yet run
        job_id = c.post("/v1/jobs", json={"manifest": str(manifest)}).json()["job_id"]
    write_jsonl(manifest, [{"id": f"swapped-{i}", **outside} for i in range(5)])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:  # the restarted service runs it
        status = wait_until_finished(c, job_id)
        rows = c.get(f"/v1/jobs/{job_id}/rows").json()["rows"]
    assert status["state"] == "succeeded" and status["rows_total"] == 1, status
    assert [(r["id"], r["status"]) for r in rows] == [("checked", "succeeded")], rows


# -- 3. media that reads other files ---------------------------------------------------------------------------


def make_playlist(root: Path, outside: Path) -> Path:
    """A real HLS playlist inside `root` whose audio segments lie in `outside`."""
    from model.media._ffmpeg import ffmpeg_exe

    outside.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    t = np.arange(48000) / 16000
    save_wav(outside / "secret.wav", 0.3 * np.sin(2 * np.pi * 300 * t), 16000)
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(outside / "secret.wav"), "-c:a", "aac"]
        + ["-f", "hls", "-hls_time", "1", "-hls_segment_filename", str(outside / "seg%d.ts"), str(outside / "x.m3u8")],
        check=True,
    )
    lines = (outside / "x.m3u8").read_text().splitlines()
    playlist = root / "speech.m3u8"
    playlist.write_text("\n".join(str(outside / line) if line.startswith("seg") else line for line in lines) + "\n")
    return playlist


def test_a_playlist_cannot_make_ffmpeg_read_files_outside_the_root(tmp_path):
    playlist = make_playlist(tmp_path / "root", tmp_path / "outside")
    assert sorted(p.name for p in (tmp_path / "outside").glob("seg*.ts"))  # segments outside the root
    with pytest.raises(InputError, match="not a supported audio format"):
        load_audio(playlist)
    copy = tmp_path / "root" / "speech.wav"  # the extension does not matter: the content is probed
    copy.write_bytes(playlist.read_bytes())
    with pytest.raises(InputError):
        load_audio(copy)
    # The writer's mux opens the audio the same way.
    segment = tmp_path / "seg.mp4"
    with VideoWriter(segment, 25, 64, 64) as writer:
        writer.write(np.zeros((25, 64, 64, 3), np.uint8))
    with pytest.raises(RuntimeError, match="the audio is not a supported audio format"):
        concat_mp4([str(segment)], tmp_path / "out.mp4", audio_path=str(playlist))
    with pytest.raises(InputError, match="not a supported audio format"):
        VideoWriter(tmp_path / "direct.mp4", 25, 64, 64, audio_path=playlist)
    assert not (tmp_path / "out.mp4").exists()


# -- 4. memory bombs -------------------------------------------------------------------------------------------


def test_parquet_manifest_bounded_by_its_footer_before_any_row_is_built(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 3_000_000
    ids = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array(["x"]))
    table = pa.table({"id": ids, "portrait": ids, "audio": ids})
    manifest = tmp_path / "bomb.parquet"
    pq.write_table(table, manifest, compression="zstd")
    del table, ids
    assert manifest.stat().st_size < 200_000  # a small file ...
    with TestClient(create_app(make_settings(tmp_path), run_jobs=False), base_url="http://127.0.0.1") as c:
        tracemalloc.start()
        try:
            response = c.post("/v1/jobs", json={"manifest": str(manifest)})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # ... of 3M rows: refused from the footer's row count. Building the rows took 1.5 GB before.
    assert response.status_code == 429 and response.json()["field"] == "manifest", response.json()
    assert "3000000 rows" in response.json()["error"]
    assert peak < 50 * 2**20, peak


def test_parquet_manifest_bounded_by_what_it_decodes_to(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One row holding a 20 MiB prompt: under 2 KB of zstd, whose footer says 20 MB decoded.
    one = pa.table({"id": ["a"], "portrait": ["p.png"], "audio": ["a.wav"], "prompt": ["x" * (20 * 2**20)]})
    pq.write_table(one, tmp_path / "prompt.parquet", compression="zstd")
    # 64 rows sharing one 1 MiB prompt through a dictionary: the footer says 1 MB, the rows would hold 64 MB. Written
    # without the Arrow schema, so a reader decodes it as plain text unless it keeps the dictionary.
    n = 64
    shared = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["y" * 2**20]))
    table = pa.table({"id": [str(i) for i in range(n)], "portrait": ["p.png"] * n, "audio": ["a.wav"] * n,
                      "prompt": shared})  # fmt: skip
    pq.write_table(table, tmp_path / "shared.parquet", compression="zstd", dictionary_pagesize_limit=4 * 2**20,
                   store_schema=False)  # fmt: skip
    assert pq.ParquetFile(tmp_path / "shared.parquet").schema_arrow.field("prompt").type == pa.string()
    for name in ("prompt.parquet", "shared.parquet"):
        assert (tmp_path / name).stat().st_size < 30_000  # small files ...
    pipeline = PipelineSettings(limits=LimitSettings(max_manifest_bytes=4 * 2**20))
    with TestClient(
        create_app(make_settings(tmp_path, pipeline=pipeline), run_jobs=False), base_url="http://127.0.0.1"
    ) as c:
        for name, decoded in (("prompt.parquet", 20 * 2**20), ("shared.parquet", 64 * 2**20)):
            response = c.post("/v1/jobs", json={"manifest": str(tmp_path / name)})
            # ... refused like a manifest over the size limit, before their rows are built
            assert response.status_code == 413 and response.json()["field"] == "manifest", (name, response.json())
            error = response.json()["error"]
            assert "rows decode to" in error and int(error.split("decode to ")[1].split()[0]) >= decoded, error
        # A manifest of text, numbers and lists of numbers (a step plan) reads as before; a list of text is refused.
        ok = pa.table({"id": ["a"], "portrait": ["/in/p.png"], "audio": ["/in/a.wav"], "steps": [[4, 2]]})
        pq.write_table(ok, tmp_path / "ok.parquet")
        assert c.post("/v1/jobs", json={"manifest": str(tmp_path / "ok.parquet")}).status_code == 202
        tags = ok.append_column("tags", pa.array([["x", "y"]]))
        pq.write_table(tags, tmp_path / "tags.parquet")
        response = c.post("/v1/jobs", json={"manifest": str(tmp_path / "tags.parquet")})
        assert response.status_code == 422 and "column 'tags'" in response.json()["error"], response.json()


def test_manifest_bounded_by_its_size(tmp_path):
    manifest = tmp_path / "big.jsonl"
    manifest.write_text(json.dumps({"id": "a", "portrait": "p.png", "audio": "a.wav", "prompt": "x" * 3000}) + "\n")
    pipeline = PipelineSettings(limits=LimitSettings(max_manifest_bytes=2000))
    with TestClient(
        create_app(make_settings(tmp_path, pipeline=pipeline), run_jobs=False), base_url="http://127.0.0.1"
    ) as c:
        response = c.post("/v1/jobs", json={"manifest": str(manifest)})
    assert response.status_code == 413 and response.json()["field"] == "manifest"


def test_a_fifo_or_device_as_manifest_is_refused_not_read_forever(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    os.mkfifo(inputs / "job.jsonl")  # opening it for reading would block until a writer comes
    (inputs / "zero.jsonl").symlink_to("/dev/zero")  # would stream zeros forever
    settings = make_settings(tmp_path, input_roots=[str(inputs)])
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        answers = {}

        def submit(name):
            answers[name] = c.post("/v1/jobs", json={"manifest": str(inputs / name)})

        workers = [threading.Thread(target=submit, args=(n,), daemon=True) for n in ("job.jsonl", "zero.jsonl")]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        with contextlib.suppress(OSError):  # a reader still blocked on the FIFO (the bug): let it go
            os.close(os.open(inputs / "job.jsonl", os.O_WRONLY | os.O_NONBLOCK))
    assert set(answers) == {"job.jsonl", "zero.jsonl"}, "a submission hung"
    assert answers["job.jsonl"].status_code == 422 and "not a regular file" in answers["job.jsonl"].json()["error"]
    assert answers["zero.jsonl"].status_code == 422  # resolved to /dev/zero: outside the root


def silent_flac(path: Path, seconds: float) -> Path:
    from model.media._ffmpeg import ffmpeg_exe

    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono"]
        + ["-t", str(seconds), "-c:a", "flac", "-y", str(path)],
        check=True,
    )
    return path


def test_audio_decode_streams_and_stops_at_the_limit(tmp_path):
    flac = silent_flac(tmp_path / "long.flac", 20 * 60)  # 20 minutes of silence in a few KB
    assert flac.stat().st_size < 400_000
    full_decode = 20 * 60 * 16000 * 4  # bytes the whole decode takes (77 MB; 5 h would be 1.2 GB)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="longer than the limit of 60 s"):
            load_audio(flac, 16000, max_seconds=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < full_decode / 8, peak  # bounded by the limit (3.8 MB of samples), not by the file
    assert len(load_audio(flac, 16000, max_seconds=20 * 60)) == full_decode // 4  # exactly at the limit: fine


def png_bomb(path: Path, side: int, complete: bool = True) -> Path:
    """A grayscale PNG of side x side pixels, all black: tiny on disk, side**2 bytes once decoded (written
    by streaming zlib, so making it costs no such memory). `complete=False` writes only part of the data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side if complete else 10)) + compressor.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_portrait_bomb_refused_by_its_header_before_decoding(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png", 13000)
    assert bomb.stat().st_size < 1_000_000  # decodes to 169 MB gray, 507 MB as RGB
    with pytest.raises(InputError, match="13000x13000 pixels, over the limit"):
        load_portrait(bomb, 64, 64)
    # Peak memory of the whole refusal, in a fresh process: far under one decoded copy.
    code = (
        "import sys\n"
        "from model.errors import InputError\n"
        "from model.media import load_portrait\n"
        "try:\n    load_portrait(sys.argv[1], 64, 64)\nexcept InputError:\n    pass\n"
        "status = open('/proc/self/status').read()\n"  # VmHWM: this process's peak (ru_maxrss spans the exec)
        "print(int(status.split('VmHWM:')[1].split()[0]) * 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    peak = int(subprocess.run([sys.executable, "-c", code, str(bomb)], env=env, capture_output=True, text=True).stdout)
    assert peak < 169_000_000, peak
    # Past PIL's own cap (here with ours raised above it), PIL's DecompressionBombError is an input error too.
    with pytest.raises(InputError, match="too large"):
        load_portrait(png_bomb(tmp_path / "huge.png", 20000, complete=False), 64, 64, max_pixels=10**12)


def test_portraits_only_in_documented_formats_and_not_degenerate(tmp_path):
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    for name in ("face.gif", "face.tiff", "face.bmp"):
        image.save(tmp_path / name)
        with pytest.raises(InputError, match="not an image in a supported format"):
            load_portrait(tmp_path / name, 64, 64)
    for name in ("face.png", "face.jpg", "face.webp"):
        image.save(tmp_path / name)
        assert load_portrait(tmp_path / name, 64, 64).shape == (64, 64, 3)
    # 6. A portrait smaller than the model could use: an input error naming its size.
    for size in ((1, 1), (20, 48), (48, 31)):
        Image.new("RGB", size).save(tmp_path / "small.png")
        with pytest.raises(InputError, match=f"image is {size[0]}x{size[1]} pixels; .* at least 32 px"):
            load_portrait(tmp_path / "small.png", 64, 64)


def test_quality_metrics_stream_the_video(tmp_path):
    """The report's metrics read the output in chunks: same numbers as scoring the whole decoded video,
    at a peak far under the decoded video's size (the full decode took twice that)."""
    from model.eval import evaluate, score
    from model.media import load_audio, read_video
    from model.synth import make_clip, write_clip

    row = write_clip(make_clip(0, 30.0, size=128), tmp_path)
    paths = {k: str(tmp_path / v) for k, v in row.items() if k != "id"}
    frames, fps = read_video(paths["video"])
    portrait = np.asarray(Image.open(paths["portrait"]).convert("RGB"))
    whole = score(frames, fps, portrait, load_audio(paths["audio"]))
    decoded_bytes = frames.nbytes  # 37 MB
    del frames
    tracemalloc.start()
    try:
        streamed = evaluate(paths["video"], paths["portrait"], paths["audio"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed == whole
    assert peak < 0.75 * decoded_bytes, (peak, decoded_bytes)


# -- 5. the API ------------------------------------------------------------------------------------------------


def test_checkpoint_option_is_confined_and_checked(tmp_path):
    inputs = tmp_path / "inputs"
    media(inputs)
    (inputs / "model").mkdir()
    shutil.copy(BUNDLED_CONFIG, inputs / "model" / "config.json")
    (inputs / "broken").mkdir()
    (inputs / "broken" / "config.json").write_text("{}")  # not a checkpoint's config
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (inputs / "sneaky").symlink_to(outside)
    row = {"id": "a", "portrait": str(inputs / "face.png"), "audio": str(inputs / "speech.wav")}
    settings = make_settings(tmp_path, input_roots=[str(inputs)])
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        for checkpoint in (
            str(outside),
            str(inputs / "sneaky"),
            "/etc",
            str(inputs / "missing"),
            str(inputs / "broken"),
            "s3://b/in/model",
        ):
            response = c.post("/v1/jobs", json={"rows": [row], "options": {"checkpoint": checkpoint}})
            assert response.status_code == 422 and response.json()["field"] == "options.checkpoint", checkpoint
        response = c.post("/v1/jobs", json={"rows": [row], "options": {"checkpoint": f" {inputs}/model "}})
        assert response.status_code == 202
        job = c.app.state.manager.store.get(response.json()["job_id"])
        assert job.request["options"]["checkpoint"] == str(inputs / "model")


def test_files_inside_a_checkpoint_are_read_confined_and_bounded(tmp_path):
    """options.checkpoint is a directory inside the root; what submission reads inside it is too, and bounded: a FIFO
    config.json does not hang the submission, a link to /dev/zero or to another tenant's file is refused. Also with
    no input roots (a loopback service): the read refuses what is not a regular file inside the checkpoint."""
    inputs = tmp_path / "inputs"
    row = {"id": "a", **media(inputs)}
    other_tenant = tmp_path / "other-tenant"
    other_tenant.mkdir()
    shutil.copy(BUNDLED_CONFIG, other_tenant / "config.json")  # a valid config: read, it would be accepted
    for name, make in (
        ("fifo", os.mkfifo),  # opening it for reading would block until a writer comes
        ("zero", lambda path: path.symlink_to("/dev/zero")),  # would stream zeros until memory runs out
        ("leak", lambda path: path.symlink_to(other_tenant / "config.json")),
    ):
        (inputs / name).mkdir()
        make(inputs / name / "config.json")
    for roots in ([str(inputs)], []):
        with TestClient(
            create_app(make_settings(tmp_path, input_roots=roots), run_jobs=False), base_url="http://127.0.0.1"
        ) as c:
            answers = {}

            def submit(name, answers=answers):
                answers[name] = c.post("/v1/jobs", json={"rows": [row], "options": {"checkpoint": str(inputs / name)}})

            workers = [threading.Thread(target=submit, args=(n,), daemon=True) for n in ("fifo", "zero", "leak")]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
            answered = set(answers)
            with contextlib.suppress(OSError):  # a reader still blocked on the FIFO (the bug): let it go
                os.close(os.open(inputs / "fifo" / "config.json", os.O_WRONLY | os.O_NONBLOCK))
        assert answered == {"fifo", "zero", "leak"}, f"a submission hung (roots {roots})"
        for name, response in answers.items():
            assert response.status_code == 422 and response.json()["field"] == "options.checkpoint", (name, roots)
        assert "not a regular file" in answers["fifo"].json()["error"]
        for name in ("zero", "leak"):
            assert "leads out of the checkpoint directory" in answers[name].json()["error"], answers[name].json()


class CountingForwarder:
    """A TCP forwarder on loopback in front of the S3 server: counts the bytes the server sends to its clients."""

    def __init__(self, endpoint_url: str):
        self.target = ("127.0.0.1", int(endpoint_url.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source, sink, count: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.received += len(data) if count else 0
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_an_oversized_checkpoint_config_on_s3_is_refused_without_reading_it_whole(tmp_path, s3_server, s3_bucket):
    from pipeline.storage import ObjectStore

    ObjectStore(s3_server).put_bytes(f"{s3_bucket}/in/model/config.json", b" " * (8 * 2**20))
    forwarder = CountingForwarder(s3_server.endpoint_url)
    storage = s3_server.model_copy(update={"endpoint_url": forwarder.url})
    settings = make_settings(tmp_path, input_roots=[f"{s3_bucket}/in"], pipeline=PipelineSettings(storage=storage))
    row = {"id": "a", "portrait": f"{s3_bucket}/in/p.png", "audio": f"{s3_bucket}/in/a.wav"}
    try:
        with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
            response = c.post("/v1/jobs", json={"rows": [row], "options": {"checkpoint": f"{s3_bucket}/in/model"}})
    finally:
        forwarder.close()
    assert response.status_code == 422 and response.json()["field"] == "options.checkpoint", response.json()
    assert "larger than the limit of 1048576 bytes" in response.json()["error"]
    assert 2**20 < forwarder.received < 2 * 2**20, forwarder.received  # a ranged read of 1 MiB + 1, not 8 MiB


def test_a_checkpoint_whose_files_lead_out_of_it_does_not_load(tmp_path, s3_server, s3_bucket):
    """On the render actor: every file of a local checkpoint must lie inside it and be a regular file (a link to
    another tenant's weights, or a FIFO, is an error naming it); an s3:// checkpoint's MANIFEST.json is bounded."""
    from model.errors import ModelComponentError
    from model.generator import AvatarModel
    from pipeline.model_cache import local_checkpoint
    from pipeline.storage import ObjectStore

    model = tmp_path / "model"
    shutil.copytree(BUNDLED_CONFIG.parent, model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (model / "model.safetensors").rename(elsewhere / "model.safetensors")
    (model / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(ModelComponentError, match=r"model/model\.safetensors: leads out of the checkpoint directory"):
        AvatarModel.load(model)
    (model / "model.safetensors").unlink()
    (elsewhere / "model.safetensors").rename(model / "model.safetensors")
    (model / "wav2vec2").symlink_to(elsewhere, target_is_directory=True)  # a folder that leads out
    with pytest.raises(ModelComponentError, match=r"model/wav2vec2: leads out of the checkpoint directory"):
        AvatarModel.load(model)
    (model / "wav2vec2").unlink()
    os.mkfifo(model / "MANIFEST.json")  # read whole, it would block the actor forever
    with pytest.raises(ModelComponentError, match=r"MANIFEST\.json: not a regular file"):
        AvatarModel.load(model)
    (model / "MANIFEST.json").unlink()
    (model / "card.md").symlink_to(model / "MODEL_CARD.md")  # a link inside the checkpoint is fine
    assert AvatarModel.load(model).preset.name == "tiny"

    ObjectStore(s3_server).put_bytes(f"{s3_bucket}/model/MANIFEST.json", b" " * (2 * 2**20))
    with pytest.raises(ModelComponentError, match="MANIFEST.json: not a checkpoint's manifest .*larger than the limit"):
        local_checkpoint(f"{s3_bucket}/model", ObjectStore(s3_server), tmp_path / "cache")


def test_option_values_are_validated_at_submission(client_factory):
    c = client_factory()
    row = {"id": "a", "portrait": "/in/p.png", "audio": "/in/a.wav"}
    for options, field in (
        ({"segment_blocks": 0}, "options.segment_blocks"),
        ({"segment_blocks": "many"}, "options.segment_blocks"),
        ({"preset": "huge-model"}, "options.preset"),
        ({"preset": ["tiny"]}, "options.preset"),
        ({"checkpoint": 7}, "options.checkpoint"),
    ):
        response = c.post("/v1/jobs", json={"rows": [row], "options": options})
        assert response.status_code == 422 and response.json()["field"] == field, (options, response.json())
    assert c.post("/v1/jobs", json={"rows": [row], "options": {"segment_blocks": 2}}).status_code == 202


@pytest.fixture
def client_factory(tmp_path):
    clients = []

    def make(**overrides):
        client = TestClient(
            create_app(make_settings(tmp_path, **overrides), run_jobs=False), base_url="http://127.0.0.1"
        )
        clients.append(client.__enter__())
        return clients[-1]

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_huge_offsets_and_limits_are_4xx(client_factory):
    c = client_factory()
    for params in ({"offset": 99999999999999999999}, {"offset": 2**63}, {"limit": 10**30}, {"offset": "1e9"}):
        response = c.get("/v1/jobs", params=params)
        assert response.status_code == 422, (params, response.status_code)
    assert c.get("/v1/jobs", params={"offset": 10**9}).json() == {"jobs": []}


def test_a_jobs_output_may_not_overlap_another_jobs(client_factory, tmp_path):
    c = client_factory(output_roots=[str(tmp_path / "out")])
    row = {"id": "a", "portrait": "/in/p.png", "audio": "/in/a.wav"}
    out = tmp_path / "out"

    def submit(output):
        return c.post("/v1/jobs", json={"rows": [row], "output": output})

    first = submit(str(out / "nightly"))
    assert first.status_code == 202
    for nested in (out / "nightly" / "part", out / "nightly" / ".segments", out / "nightly"):
        response = submit(str(nested))
        assert response.status_code == 409 and response.json()["field"] == "output", nested
        assert first.json()["job_id"] in response.json()["error"]
    response = submit(str(out))  # the root itself would contain every later job
    assert response.status_code == 422 and response.json()["field"] == "output"
    assert submit(str(out / "nightly-2")).status_code == 202  # a sibling whose name starts the same is fine
    c.delete(f"/v1/jobs/{first.json()['job_id']}")
    assert submit(str(out / "nightly")).status_code == 202  # a finished job's output: a re-run


def test_a_second_service_on_the_same_state_dir_refuses_to_start(tmp_path):
    from deploy.store import StateDirLocked

    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1"):
        with pytest.raises(StateDirLocked, match="in use by another avatar-render service"):
            create_app(settings, run_jobs=False)
        code = "import sys; from deploy.store import JobStore; from pathlib import Path; JobStore(Path(sys.argv[1]))"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        other = subprocess.run([sys.executable, "-c", code, str(settings.state_dir)], env=env, capture_output=True)
        assert other.returncode != 0 and b"in use by another avatar-render service" in other.stderr
    # The first one stopped: free again.
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        assert c.get("/healthz").status_code == 200


def test_s3_secret_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATAR_RENDER_STORAGE__SECRET_ACCESS_KEY", "wJalrXUtnFEMI-very-secret")
    monkeypatch.setenv("AVATAR_RENDER_STATE_DIR", str(tmp_path / "state"))
    settings = ServiceSettings()
    assert settings.pipeline.storage.secret_access_key.get_secret_value() == "wJalrXUtnFEMI-very-secret"
    storage = StorageSettings(secret_access_key="wJalrXUtnFEMI-very-secret")
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(storage), storage.model_dump_json()):
        assert "very-secret" not in text
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        job = c.post("/v1/jobs", json={"rows": [{"id": "a", "portrait": "/p.png", "audio": "/a.wav"}]}).json()
        for path in ("/v1/jobs", f"/v1/jobs/{job['job_id']}", "/openapi.json", "/metrics", "/healthz"):
            assert "very-secret" not in c.get(path).text


def test_a_failed_jobs_error_is_one_short_line(ray_cluster, tmp_path):
    """A job that fails inside Ray (its checkpoint cannot be loaded by the render actors): its error is the
    cause in one line, not Ray's 2,000-character traceback with internal paths and node addresses."""
    from deploy.jobs import MAX_ERROR_CHARS, one_line_error

    inputs = tmp_path / "inputs"
    good = media(inputs)
    (inputs / "model").mkdir()
    shutil.copy(BUNDLED_CONFIG, inputs / "model" / "config.json")  # a valid config ...
    (inputs / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")  # ... bad weights
    settings = make_settings(tmp_path, input_roots=[str(inputs)])
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        body = {"rows": [{"id": "a", **good}], "options": {"checkpoint": str(inputs / "model")}}
        status = wait_until_finished(c, c.post("/v1/jobs", json=body).json()["job_id"])
    error = status["error"]
    assert status["state"] == "failed" and error.startswith("a render actor failed to start: "), error
    assert "\n" not in error and len(error) <= MAX_ERROR_CHARS
    assert not any(noise in error for noise in ("Traceback", "File ", "ip=", "pid=", ".py")), error

    @ray_cluster.remote
    def deep():
        raise ValueError("row 3 names no portrait\n(more detail on a second line)")

    with pytest.raises(Exception) as caught:
        ray_cluster.get(deep.remote())
    assert one_line_error(caught.value) == "ValueError: row 3 names no portrait"
    assert len(one_line_error(RuntimeError("x" * 5000))) == MAX_ERROR_CHARS


# -- more escapes ------------------------------------------------------------------------------------------------


def test_a_symlink_inside_the_output_root_cannot_redirect_a_rows_output(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    rows = [{"id": "a", "portrait": "p.png", "audio": "a.wav", "output": "sub/a.mp4"}]
    rows.append({"id": "b", "portrait": "p.png", "audio": "a.wav", "output": f"file://{out}/sub/b.mp4"})
    tasks = validate_rows(
        rows, output_root=f"file://{out}", base_uri="file:///in", limits=LimitSettings(), preset=get_preset("tiny")
    )
    for task in tasks:
        assert task.error and "out" in task.error, task


def test_manifest_parsing_failures_are_4xx_or_row_errors(client_factory, tmp_path):
    c = client_factory()
    deep = tmp_path / "deep.jsonl"
    deep.write_text(json.dumps({"id": "ok", "portrait": "/p.png", "audio": "/a.wav"}) + "\n" + "[" * 100_000 + "\n")
    response = c.post("/v1/jobs", json={"manifest": str(deep)})
    assert response.status_code == 202  # the nested line is a failed row; the good one still runs
    tasks = c.app.state.manager.store.tasks(response.json()["job_id"])
    assert [t["error"] for t in tasks][1].endswith("JSON nested too deeply")
    wide = tmp_path / "wide.csv"
    wide.write_text("id,portrait,audio,prompt\na,/p.png,/a.wav," + "x" * 200_000 + "\n")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1" + os.urandom(100) + b"PAR1")
    for manifest in (wide, bad_parquet):
        response = c.post("/v1/jobs", json={"manifest": str(manifest)})
        assert response.status_code == 422 and response.json()["field"] == "manifest", response.json()


def test_long_ids_and_prompts(tmp_path):
    rows = [
        {"id": "x" * 5000, "portrait": "p.png", "audio": "a.wav"},
        {"id": "p", "portrait": "p.png", "audio": "a.wav", "prompt": "y" * 10_000},
    ]
    named, prompted = validate_rows(
        rows, output_root="file:///out", base_uri="file:///in", limits=LimitSettings(), preset=get_preset("tiny")
    )
    assert named.error is None and len(os.path.basename(named.output).encode()) <= 255
    assert prompted.error and "at most 4000" in prompted.error


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # a pickle may call anything; this one only creates a file


def test_a_pickled_checkpoint_cannot_run_code(tmp_path):
    """Weights load through safetensors or torch.load(weights_only=True): a .pth whose pickle calls a
    function is refused, and the function never runs."""
    import pickle

    import torch

    from model.checkpoint import read_state_dict

    marker = tmp_path / "ran"
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCodeWhenUnpickled(str(marker))}, tmp_path / "x.pth"
    )
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(tmp_path / "x.pth")
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "plain.pth")
    assert torch.equal(read_state_dict(tmp_path / "plain.pth")["w"], torch.ones(2))


def test_inputs_over_max_input_bytes_fail_before_download(tmp_path, s3_server, s3_bucket):
    from pipeline.stages import input_copy
    from pipeline.storage import ObjectStore

    store = ObjectStore(s3_server)
    limits = LimitSettings(max_input_bytes=1000)
    (tmp_path / "big.wav").write_bytes(b"\0" * 1001)
    store.put_bytes(f"{s3_bucket}/in/big.wav", b"\0" * 1001)
    for uri in (normalize_uri(str(tmp_path / "big.wav")), f"{s3_bucket}/in/big.wav"):
        with pytest.raises(InputError, match="audio file is over the limit of 1000 bytes"):
            with input_copy(store, uri, "audio", limits):
                pass
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "dir").symlink_to(tmp_path / "real")  # the path checked was .../real/a.wav ...
    checked = normalize_uri(str(tmp_path / "dir" / "a.wav"))
    (tmp_path / "dir").unlink()
    (tmp_path / "real").rename(tmp_path / "was-real")
    (tmp_path / "real").symlink_to("/etc")  # ... now a symlink leads out of it
    with pytest.raises(InputError, match="now leads elsewhere"):
        with input_copy(store, checked, "audio", limits):
            pass


def test_a_store_from_before_these_columns_opens_and_keeps_its_jobs(tmp_path):
    """A state dir written by the previous service: the new columns are added, the outputs filled in from
    the stored requests, so the overlap check sees the old jobs too."""
    import sqlite3

    from deploy.store import JobStore

    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "jobs.sqlite3")
    db.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE NOT NULL, request TEXT NOT NULL,"
        " state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, rows_total INTEGER,"
        " cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, error TEXT);"
        "CREATE TABLE rows (job_id TEXT NOT NULL, row_id TEXT NOT NULL, status TEXT NOT NULL, output TEXT, error TEXT,"
        " error_kind TEXT, frames INTEGER NOT NULL DEFAULT 0, video_seconds REAL NOT NULL DEFAULT 0, duration_s REAL,"
        " timings TEXT NOT NULL DEFAULT '{}', metrics TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (job_id, row_id));"
    )
    request = {"manifest": None, "rows": [], "output": "file:///out/old", "actors": None, "force": False, "options": {}}
    db.execute(
        "INSERT INTO jobs (job_id, request, state, created) VALUES ('job-old', ?, 'queued', 1.0)",
        (json.dumps(request),),
    )
    db.execute("INSERT INTO rows (job_id, row_id, status) VALUES ('job-old', 'a', 'succeeded')")
    db.commit()
    db.close()
    store = JobStore(state)
    try:
        assert [(o.job_id, o.output, o.state) for o in store.outputs()] == [("job-old", "file:///out/old", "queued")]
        (row,) = store.rows("job-old")
        assert row.status == "succeeded" and row.render_attempts == 0 and row.resumed_from_segment is None
        assert row.rows_in_batch == 0
    finally:
        store.close()


def test_status_and_list_reads_never_parse_a_jobs_rows(client_factory):
    """A job's checked rows (4 MB of JSON for 10,000 rows) are kept apart from its request: listing jobs and a job's
    status read the small request alone; the rows are read only to run the job."""
    c = client_factory()
    rows = [{"id": f"r{i}", "portrait": "/in/p.png", "audio": "/in/a.wav"} for i in range(2000)]
    job_id = c.post("/v1/jobs", json={"rows": rows}).json()["job_id"]
    store = c.app.state.manager.store
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # every SQL statement the reads below run
    try:
        assert c.get("/v1/jobs").json()["jobs"][0]["rows_total"] == 2000
        assert c.get(f"/v1/jobs/{job_id}").json()["counts"] == {"pending": 2000}
        assert c.get(f"/v1/jobs/{job_id}/rows").status_code == 200
    finally:
        store._db.set_trace_callback(None)
    assert statements and not [s for s in statements if "job_tasks" in s], statements
    (request_chars,) = store._db.execute("SELECT length(request) FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    assert request_chars < 1000, request_chars  # what every status read parses
    tasks = store.tasks(job_id)  # what running the job reads
    assert [t["id"] for t in tasks] == [f"r{i}" for i in range(2000)] and tasks[0]["portrait"] == "file:///in/p.png"


def test_a_store_that_kept_tasks_in_the_request_opens_and_runs_them(tmp_path):
    """A state dir of the service before the tasks had their own table: they move there when it opens, the requests
    lose them, and a queued job still runs the rows that were checked (not its manifest again)."""
    import sqlite3

    from deploy.jobs import JobManager
    from deploy.metrics import ServiceMetrics
    from deploy.store import JobStore

    settings = make_settings(tmp_path)
    store = JobStore(settings.state_dir)
    store._db.execute("DROP TABLE job_tasks")  # the store as that service left it
    store.close()
    task = {"index": 0, "id": "a", "portrait": "file:///in/p.png", "audio": "file:///in/a.wav",
            "output": "file:///out/old/a.mp4", "segments": "file:///out/old/.segments/a-0"}  # fmt: skip
    request = {"manifest": "file:///in/gone.jsonl", "tasks": [task], "output": "file:///out/old", "actors": None,
               "force": False, "options": {}}  # fmt: skip
    db = sqlite3.connect(settings.state_dir / "jobs.sqlite3")
    db.execute(
        "INSERT INTO jobs (job_id, request, state, created, output) VALUES ('job-old', ?, 'queued', 1.0, ?)",
        (json.dumps(request), request["output"]),
    )
    db.commit()
    db.close()
    store = JobStore(settings.state_dir)
    try:
        job = store.get("job-old")
        assert "tasks" not in job.request and job.request["manifest"] == "file:///in/gone.jsonl"
        assert store.tasks("job-old") == [task]
        manager = JobManager(settings, store, ServiceMetrics(), run_jobs=False)
        spec = manager._spec_to_run(job)  # what the worker hands to run_job
        assert spec.manifest is None and [t.model_dump(mode="json", include=set(task)) for t in spec.tasks] == [task]
    finally:
        store.close()


def test_a_job_keeps_the_model_it_was_checked_for(tmp_path):
    """A job that names no checkpoint runs with the service's model as it was at submission: the operator changing
    AVATAR_RENDER_CHECKPOINT (or the preset) and restarting does not resume its rows with another model."""
    from pipeline.job import job_settings

    first, second = tmp_path / "model-a", tmp_path / "model-b"
    for directory in (first, second):
        directory.mkdir()
        shutil.copy(BUNDLED_CONFIG, directory / "config.json")
    row = {"id": "a", **media(tmp_path / "in")}

    def submit(pipeline: PipelineSettings) -> str:
        with TestClient(
            create_app(make_settings(tmp_path, pipeline=pipeline), run_jobs=False), base_url="http://127.0.0.1"
        ) as c:
            response = c.post("/v1/jobs", json={"rows": [row]})
            assert response.status_code == 202, response.json()
            return response.json()["job_id"]

    with_checkpoint = submit(PipelineSettings(checkpoint=str(first)))
    bundled = submit(PipelineSettings(checkpoint=None))  # the suite sets AVATAR_RENDER_CHECKPOINT (conftest)
    restarted = make_settings(tmp_path, pipeline=PipelineSettings(checkpoint=str(second), preset="wan2.1-1.3b"))
    with TestClient(create_app(restarted, run_jobs=False), base_url="http://127.0.0.1") as c:
        manager = c.app.state.manager
        for job_id, checkpoint, preset in ((with_checkpoint, str(first), None), (bundled, None, "tiny")):
            spec = manager._spec_to_run(manager.store.get(job_id))
            settings = job_settings(spec, restarted.pipeline)  # what run_job and its render actors load
            assert settings.checkpoint == checkpoint, (job_id, spec.options)
            assert preset is None or settings.preset == preset, (job_id, spec.options)
