"""Manifests: the three formats, path resolution, and a per-row error for every kind of bad row."""

from __future__ import annotations

import json

import pytest

from model.config import get_preset
from pipeline.manifest import read_manifest, validate_rows
from pipeline.settings import LimitSettings
from pipeline.storage import ObjectStore
from pipeline.uri import normalize_uri

ROWS = [
    {"id": "a", "portrait": "faces/a.png", "audio": "speech/a.wav", "prompt": "a person talking"},
    {
        "id": "b",
        "portrait": "/abs/b.png",
        "audio": "s3://bucket/b.wav",
        "seed": 7,
        "steps": "4,2",
        "output": "sub/b.mp4",
    },
]


def _validate(rows, root="file:///out", base="file:///jobs"):
    return validate_rows(rows, output_root=root, base_uri=base, limits=LimitSettings(), preset=get_preset("tiny"))


def _write(tmp_path, fmt: str) -> str:
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    else:
        import pandas as pd

        frame = pd.DataFrame(ROWS)
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_read_alike(tmp_path, fmt):
    uri = _write(tmp_path, fmt)
    tasks = _validate(read_manifest(uri, ObjectStore()), base=normalize_uri(str(tmp_path)))
    a, b = tasks
    assert a.error is None and b.error is None
    assert a.portrait == f"file://{tmp_path}/faces/a.png"  # relative to the manifest's directory
    assert a.output == "file:///out/a.mp4" and a.prompt == "a person talking" and a.render.seed == 0
    assert b.portrait == "file:///abs/b.png" and b.audio == "s3://bucket/b.wav"
    assert b.output == "file:///out/sub/b.mp4"
    assert b.render.seed == 7 and b.render.step_plan == (4, 2)
    assert a.segments.startswith("file:///out/.segments/a-") and a.segments != b.segments


def test_manifest_from_s3(s3_server, s3_bucket):
    store = ObjectStore(s3_server)
    store.put_bytes(f"{s3_bucket}/jobs/m.jsonl", json.dumps(ROWS[0]).encode())
    (task,) = _validate(read_manifest(f"{s3_bucket}/jobs/m.jsonl", store), base=f"{s3_bucket}/jobs")
    assert task.portrait == f"{s3_bucket}/jobs/faces/a.png"


def test_bad_rows_fail_alone_with_a_clear_error():
    good = {"portrait": "p.png", "audio": "a.wav"}
    rows = [
        {"id": "ok", **good},
        {**good},  # no id
        {"id": "ok", **good},  # duplicate
        {"id": "typo", **good, "seeed": 3},  # unknown column
        {"id": "unset", **good, "seeed": None},  # unknown column, not set on this row: fine
        {"id": "steps", **good, "steps": "8,x"},
        {"id": "zero", **good, "steps": [4, 0]},
        {"id": "size", **good, "height": 63},  # not a multiple of the model's stride
        {"id": "seed", **good, "seed": 1.5},
        {"id": "noaudio", "portrait": "p.png"},
        {"id": "escape", **good, "output": "../../etc/x.mp4"},
        {"id": "outside", **good, "output": "file:///elsewhere/x.mp4"},
        {"id": "notmp4", **good, "output": "x.txt"},
        {"id": "same-output", **good, "output": "ok.mp4"},
        "line 15: not valid JSON (Expecting value)",
        {"id": 42, **good},  # numeric ids are fine
        {"id": "many", **good, "steps": "8,65"},  # over LimitSettings.max_steps
        {"id": "tall", **good, "height": 1088},  # over LimitSettings.max_height (a multiple of the stride)
        {"id": "wide", **good, "width": 1936},  # over LimitSettings.max_width
    ]
    tasks = _validate(rows)
    errors = {t.index: t.error for t in tasks}
    assert [t.index for t in tasks] == list(range(len(rows)))
    assert errors[0] is None and errors[4] is None and errors[15] is None and tasks[15].id == "42"
    expected = {
        1: "row 2: missing id",
        2: "duplicate id (first used by row 1)",
        3: "unknown column(s) 'seeed'",
        5: "steps: bad step plan '8,x': want positive integers",
        6: "steps: bad step plan [4, 0]",
        7: "must be a multiple of",
        8: "seed must be an integer",
        9: "missing audio",
        10: "must be relative",
        11: "outside the output root",
        12: "must end in .mp4",
        13: "also the output of id 'ok'",
        14: "not valid JSON",
        16: "steps: at most 64 per block, got '8,65'",
        17: "height must be in [1, 1080], got 1088",
        18: "width must be in [1, 1920], got 1936",
    }
    for index, text in expected.items():
        assert errors[index] is not None and text in errors[index], (index, errors[index])
        assert errors[index].startswith(f"row {index + 1}"), errors[index]  # names the row


def test_row_ids_cannot_escape_the_output_root():
    (task,) = _validate([{"id": "../../etc/passwd", "portrait": "p.png", "audio": "a.wav"}])
    assert task.error is None
    name = task.output[len("file:///out/") :]
    assert task.output.startswith("file:///out/") and "/" not in name and not name.startswith(".")


def test_unknown_format_fails_the_job(tmp_path):
    (tmp_path / "m.txt").write_text("{}")
    with pytest.raises(ValueError, match="unknown manifest format"):
        read_manifest(str(tmp_path / "m.txt"), ObjectStore())
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "missing.jsonl"), ObjectStore())


def test_a_truth_video_resolves_like_an_input_and_never_changes_the_render():
    base = {"id": "a", "portrait": "face.png", "audio": "speech.wav"}
    (plain,) = _validate([base])
    with_truth, bad = _validate([{**base, "truth_video": "takes/a.mp4"}, {**base, "id": "d", "truth_video": 7}])
    assert plain.truth_video is None and with_truth.truth_video == "file:///jobs/takes/a.mp4"
    # The segment key is the render's inputs: a truth is only scored against, so adding one resumes the same render.
    assert with_truth.segments == plain.segments
    assert bad.error == "row 2 (id 'd'): truth_video must be a URI or path, got int"
