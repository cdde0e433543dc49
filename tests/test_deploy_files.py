"""The deployment files parse, agree with each other, and the dashboard only queries metrics that exist."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from deploy.app import create_app
from deploy.settings import ServiceSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC = re.compile(r"\bavatar_render_[a-z0-9_]+")
PROMQL_FUNCTIONS = re.compile(r"\b(sum|rate|increase|histogram_quantile|by|le)\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_has_the_panels_and_queries_only_exported_metrics(tmp_path):
    from test_metrics import feed_job_events

    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("frames / s", "video-seconds / s", "queue", "failures", "stage latency", "fps per actor"):
        assert topic in titles, topic
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])

    with TestClient(create_app(ServiceSettings(state_dir=tmp_path), run_jobs=False), base_url="http://127.0.0.1") as c:
        job_id = c.post("/v1/jobs", json={"rows": [{"id": "a", "portrait": "/p", "audio": "/a"}]}).json()["job_id"]
        feed_job_events(c.app.state.manager, job_id)
        c.post("/v1/jobs", json={"rows": []})  # one rejected request, so that series exists too
        exported = {s.name for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples}
    queried = {name for expr in dashboard_queries() for name in METRIC.findall(expr)}
    assert len(queried) >= 8
    assert queried <= exported, sorted(queried - exported)


def test_prometheus_scrape_config_targets_the_service_metrics():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    service = jobs["avatar-render"]
    assert service["metrics_path"] == "/metrics"
    assert service["static_configs"][0]["targets"][0].endswith(":8000")


def test_serve_config_and_rayservice_agree_and_import():
    serve_config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    documents = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    rayservice = next(d for d in documents if d["kind"] == "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve_config["applications"]

    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)  # Ray's own schema of a Serve config file
    (application,) = serve_config["applications"]
    module_name, attribute = application["import_path"].split(":")
    from ray.serve import Application

    assert isinstance(getattr(importlib.import_module(module_name), attribute), Application)
    env = application["runtime_env"]["env_vars"]
    assert env["AVATAR_RENDER_DEVICE"] == "cuda"  # render actors then ask Ray for num_gpus=1 each
    assert env["AVATAR_RENDER_HOST"] == "0.0.0.0"
    (deployment,) = application["deployments"]
    assert deployment["num_replicas"] == 1

    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    head_env = {e["name"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert "AVATAR_RENDER_AUTH_TOKEN" in head_env  # a public bind needs the token; it comes from a secret
    service_resource = next(iter(deployment["ray_actor_options"]["resources"]))
    assert service_resource in head["rayStartParams"]["resources"]  # the replica lands on the head (state volume)
    (gpu_group,) = cluster["workerGroupSpecs"]
    assert gpu_group["rayStartParams"]["num-gpus"] == "1"
    container = gpu_group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"] for e in container["env"]} == head_env


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AVATAR_RENDER_PORT", "9123")
    monkeypatch.setenv("AVATAR_RENDER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AVATAR_RENDER_OUTPUT_ROOTS", '["s3://bucket/out"]')
    monkeypatch.setenv("AVATAR_RENDER_MAX_ROWS_PER_JOB", "7")
    monkeypatch.setenv("AVATAR_RENDER_NUM_ACTORS", "3")
    monkeypatch.setenv("AVATAR_RENDER_STORAGE__ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AVATAR_RENDER_LIMITS__MAX_AUDIO_SECONDS", "60")
    settings = ServiceSettings()
    assert (settings.port, settings.state_dir, settings.output_roots) == (9123, tmp_path, ["s3://bucket/out"])
    assert settings.max_rows_per_job == 7 and settings.pipeline.num_actors == 3
    assert settings.pipeline.storage.endpoint_url == "http://127.0.0.1:9000"
    assert settings.max_audio_seconds_per_row == 60


def test_kuberay_keeps_rays_ports_inside_the_cluster():
    """Ray's dashboard, client and GCS run code for anyone who reaches them, without the service's token:
    only the job API is open to the world; the rest admits this cluster's pods (and the operator)."""
    documents = list(yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text()))
    rayservice = next(d for d in documents if d["kind"] == "RayService")
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for template in templates:  # the policy covers every pod of the cluster
        assert selected.items() <= template["metadata"]["labels"].items(), template["metadata"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]

    head_ports = {p["containerPort"] for p in templates[0]["spec"]["containers"][0]["ports"]}
    assert 10001 not in head_ports  # the Ray client is not used: not even declared
    for rule in policy["spec"]["ingress"]:
        sources = rule.get("from")
        ports = {p["port"] for p in rule.get("ports", [])}
        if not sources:  # open to every source: the job API only
            assert ports == {8000}, rule
            continue
        for source in sources:
            if "podSelector" in source and "namespaceSelector" not in source:
                assert source["podSelector"]["matchLabels"] == selected  # the cluster's own pods
            else:  # another namespace (the operator, Prometheus) reaches named ports only, never the GCS or client
                assert ports and not ports & {6379, 10001}, rule
    docs = (DEPLOY.parent / "docs" / "service.md").read_text()
    assert "NetworkPolicy" in docs and "8265" in docs
