"""The HTTP API contract, with rendering switched off (`run_jobs=False`): auth, 4xx that name the field,
413/429 limits, output confinement, and a job store that outlives the app."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deploy.app import create_app
from deploy.settings import ServiceSettings

TOKEN = "s3cret-token"


def make_settings(tmp_path, **overrides) -> ServiceSettings:
    return ServiceSettings(state_dir=tmp_path / "state", **overrides)


def row(i: int = 0) -> dict:
    return {"id": f"row-{i}", "portrait": "/inputs/face.png", "audio": "/inputs/speech.wav"}


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(make_settings(tmp_path), run_jobs=False), base_url="http://127.0.0.1") as c:
        yield c


def test_token_required_unless_loopback(tmp_path):
    with pytest.raises(ValidationError, match="AVATAR_RENDER_AUTH_TOKEN"):
        make_settings(tmp_path, host="0.0.0.0")
    with pytest.raises(ValidationError, match="requires a bearer token"):
        make_settings(tmp_path, host="10.1.2.3", auth_token="")
    assert make_settings(tmp_path, host="0.0.0.0", auth_token=TOKEN).auth_token.get_secret_value() == TOKEN
    for loopback in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert make_settings(tmp_path, host=loopback).auth_token is None


def test_serve_command_refuses_public_host_without_token(tmp_path, monkeypatch):
    from cli.main import main

    monkeypatch.delenv("AVATAR_RENDER_AUTH_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="requires a bearer token"):
        main(["serve", "--host", "0.0.0.0", "--uvicorn", "--state-dir", str(tmp_path)])


def test_token_enforced_on_every_v1_route(tmp_path):
    settings = make_settings(tmp_path, auth_token=TOKEN)
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        good = {"Authorization": f"Bearer {TOKEN}"}
        job_id = c.post("/v1/jobs", json={"rows": [row()]}, headers=good).json()["job_id"]
        calls = [
            ("get", "/v1/jobs"),
            ("post", "/v1/jobs"),
            ("get", f"/v1/jobs/{job_id}"),
            ("get", f"/v1/jobs/{job_id}/rows"),
            ("delete", f"/v1/jobs/{job_id}"),
        ]
        for method, path in calls:
            kwargs = {"json": {"rows": [row()]}} if method == "post" else {}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                response = c.request(method, path, headers=headers, **kwargs)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "token" in response.json()["error"]
        assert c.get("/v1/jobs", headers=good).status_code == 200
        assert c.get(f"/v1/jobs/{job_id}", headers=good).json()["state"] == "queued"  # the DELETEs were refused
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200


def test_bad_requests_get_4xx_naming_the_field(client, tmp_path):
    missing = tmp_path / "missing.jsonl"
    root = client.app.state.settings.effective_output_roots()[0]
    cases = [
        ({"rows": [1]}, "rows.0"),
        ({"rows": []}, "rows"),
        ({}, "manifest"),
        ({"manifest": str(missing), "rows": [row()]}, "manifest"),
        ({"rows": [row()], "actors": 0}, "actors"),
        ({"rows": [row()], "actors": 10_000}, "actors"),
        ({"rows": [row()], "force": "maybe"}, "force"),
        ({"rows": [row()], "bogus": 1}, "bogus"),
        ({"rows": [row()], "options": {"segment_blocks": 2, "turbo": True}}, "options.turbo"),
        ({"manifest": "ftp://host/jobs.jsonl"}, "manifest"),
        ({"manifest": str(missing)}, "manifest"),
        ({"rows": [row()], "output": "/etc"}, "output"),
        ({"rows": [row()], "output": f"{root}/../escape"}, "output"),
        ({"rows": [row()], "output": f"{root}-sibling/x"}, "output"),
        ({"rows": [row()], "output": "s3://bucket/out"}, "output"),
        ({"rows": [row()], "output": "http://example.com/out"}, "output"),
    ]
    for body, field in cases:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, (body, response.status_code, response.text)
        assert response.json()["field"] == field, (body, response.json())
        assert response.json()["error"]
    response = client.post("/v1/jobs", content=b'{"rows": [', headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "body"
    response = client.get("/v1/jobs", params={"limit": 0})
    assert response.status_code == 422 and response.json()["field"] == "limit"
    response = client.get("/v1/jobs/job-nope")
    assert response.status_code == 404 and response.json()["field"] == "job_id"
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was accepted


def test_no_5xx_for_garbage_input(client):
    bodies = [
        b"",
        b"null",
        b"[]",
        b'"rows"',
        b"{}" * 1000,
        b"\xff\xfe\x00",
        b'{"rows": [{"id": null}]}',
        b'{"manifest": ""}',
        b'{"manifest": "\\u0000"}',
        b'{"rows": [{}], "options": []}',
        json.dumps({"rows": [{"id": "x" * 10_000}]}).encode(),
        b'{"rows": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"manifest": "s3://bucket/jobs.jsonl"}',  # storage that refuses (no credentials here)
        b'{"manifest": "/' + b"c" * 5000 + b'.jsonl"}',
        b'{"manifest": "/tmp/\ud800.jsonl"}',
        b'{"manifest": " file:/etc/passwd.jsonl"}',
        b'{"rows": [{"id": "\ud800", "portrait": "/p\ud800", "audio": "/a"}]}',
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a", "height": 1e400, "seed": 1e30}]}',
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a", "output": "' + b"a" * 3000 + b'.mp4"}]}',
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a"}], "options": {"segment_blocks": 1e400}}',
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a"}], "options": {"segment_blocks": 1' + b"0" * 30 + b"}}",
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a"}], "options": {"checkpoint": "/' + b"d" * 5000 + b'"}}',
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a"}], "output": "/' + b"b" * 5000 + b'"}',
        b'{"rows": [{"id": "a", "portrait": "/p", "audio": "/a"}], "actors": 1' + b"0" * 30 + b"}",
    ]
    for body in bodies:
        response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert response.status_code < 500, (body[:40], response.status_code, response.text)
    for path in (
        "/v1/jobs/%00",
        "/v1/jobs/..%2F..%2Fetc",
        "/v1/jobs?state=bogus",
        "/v1/jobs?offset=-1",
        "/v1/jobs?offset=99999999999999999999",
        "/v1/jobs?limit=1e3",
        "/v1/jobs/" + "x" * 10_000,
        "/v1/jobs/" + "x" * 10_000 + "/rows",
    ):
        assert client.get(path).status_code < 500, path


def test_limits_answer_413_and_429(tmp_path):
    settings = make_settings(tmp_path, max_rows_per_job=3, max_request_bytes=2_000, max_pending_jobs=2)
    manifest = tmp_path / "big.jsonl"
    manifest.write_text("".join(json.dumps(row(i)) + "\n" for i in range(4)))
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        too_many = c.post("/v1/jobs", json={"rows": [row(i) for i in range(4)]})
        assert too_many.status_code == 429 and too_many.json()["field"] == "rows"
        too_many = c.post("/v1/jobs", json={"manifest": str(manifest)})
        assert too_many.status_code == 429 and too_many.json()["field"] == "manifest"

        big = {"rows": [row()], "options": {"pad": "x" * 3_000}}
        assert c.post("/v1/jobs", json=big).status_code == 413

        def chunked():  # no Content-Length: the service must count the bytes as they arrive
            yield b'{"rows": [' + json.dumps(row()).encode() + b'], "options": {"pad": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}}'

        response = c.post("/v1/jobs", content=chunked(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["field"] == "body"

        for _ in range(2):
            assert c.post("/v1/jobs", json={"rows": [row()]}).status_code == 202
        full = c.post("/v1/jobs", json={"rows": [row()]})
        assert full.status_code == 429 and full.json()["field"] == "job"
        metrics = c.get("/metrics").text
        assert 'avatar_render_requests_rejected_total{code="413"} 2.0' in metrics
        assert 'avatar_render_requests_rejected_total{code="429"} 3.0' in metrics
        assert "avatar_render_queue_rows 2.0" in metrics  # two queued one-row jobs


def test_input_roots_confine_manifests_and_row_media(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "job.jsonl").write_text(json.dumps({"id": "a", "portrait": "face.png", "audio": "../x.wav"}) + "\n")
    settings = make_settings(tmp_path, input_roots=[str(inputs)])
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        outside = c.post("/v1/jobs", json={"rows": [{"id": "a", "portrait": str(inputs / "f.png"), "audio": "/etc/x"}]})
        assert outside.status_code == 422 and outside.json()["field"] == "rows.0.audio"
        escaping = c.post("/v1/jobs", json={"manifest": str(inputs / "job.jsonl")})
        assert escaping.status_code == 422 and escaping.json()["field"] == "manifest.rows.0.audio"
        assert c.post("/v1/jobs", json={"manifest": "/etc/passwd.jsonl"}).json()["field"] == "manifest"
        inside = {"id": "a", "portrait": str(inputs / "f.png"), "audio": f"file://{inputs}/s.wav"}
        truth_outside = c.post("/v1/jobs", json={"rows": [{**inside, "truth_video": "/etc/x.mp4"}]})
        assert truth_outside.status_code == 422 and truth_outside.json()["field"] == "rows.0.truth_video"
        assert c.post("/v1/jobs", json={"rows": [{**inside, "truth_video": str(inputs / "t.mp4")}]}).status_code == 202
        assert c.post("/v1/jobs", json={"rows": [inside]}).status_code == 202


def test_outputs_default_under_the_root_and_are_confined(tmp_path):
    out = tmp_path / "renders"
    settings = make_settings(tmp_path, output_roots=[str(out), "s3://studio/renders"])
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        default = c.post("/v1/jobs", json={"rows": [row()]}).json()["job_id"]
        assert c.get(f"/v1/jobs/{default}").json()["output"] == f"file://{out}/{default}"
        chosen = c.post("/v1/jobs", json={"rows": [row()], "output": f"{out}/nightly/./a/../b"}).json()["job_id"]
        assert c.get(f"/v1/jobs/{chosen}").json()["output"] == f"file://{out}/nightly/b"
        s3 = c.post("/v1/jobs", json={"rows": [row()], "output": "s3://studio/renders/x"}).json()["job_id"]
        assert c.get(f"/v1/jobs/{s3}").json()["output"] == "s3://studio/renders/x"
        for bad in ("s3://studio/renders/../secrets", "s3://studio/renders2", "s3://other/renders"):
            assert c.post("/v1/jobs", json={"rows": [row()], "output": bad}).status_code == 422, bad
    (tmp_path / "link").symlink_to("/etc")
    settings = make_settings(tmp_path, output_roots=[str(tmp_path)])
    with TestClient(
        create_app(settings, run_jobs=False), base_url="http://127.0.0.1"
    ) as c:  # a symlink out of the root is resolved first
        response = c.post("/v1/jobs", json={"rows": [row()], "output": str(tmp_path / "link" / "x")})
        assert response.status_code == 422 and response.json()["field"] == "output"


def test_jobs_persist_across_restart_and_cancel(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        kept = c.post("/v1/jobs", json={"rows": [row(0), row(1)], "force": True}).json()["job_id"]
        dropped = c.post("/v1/jobs", json={"rows": [row(2)]}).json()["job_id"]
        cancelled = c.delete(f"/v1/jobs/{dropped}")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        assert c.delete(f"/v1/jobs/{dropped}").status_code == 202  # idempotent
    with TestClient(create_app(settings, run_jobs=False), base_url="http://127.0.0.1") as c:
        jobs = {job["job_id"]: job for job in c.get("/v1/jobs").json()["jobs"]}
        assert list(jobs) == [dropped, kept]  # newest first
        assert jobs[kept]["state"] == "queued" and jobs[kept]["rows_total"] == 2
        assert jobs[kept]["counts"] == {"pending": 2} and jobs[kept]["progress"] == 0.0
        assert jobs[dropped]["state"] == "cancelled" and jobs[dropped]["cancel_requested"]
        assert [j["job_id"] for j in c.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]] == [kept]
        assert c.get(f"/v1/jobs/{kept}/rows").json() == {"job_id": kept, "rows": []}
        assert c.get("/healthz").json()["jobs"]["queued"] == 1


def test_openapi_schema_lists_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/rows", "/healthz", "/metrics"} <= set(schema["paths"])
    assert set(schema["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "JobRequest" in schema["components"]["schemas"]
