"""Shared fixtures: one local Ray cluster and one moto S3 server (real HTTP on 127.0.0.1) per session, and the small
random model every job of the suite renders with unless a test names another."""

from __future__ import annotations

import socket
import uuid

import pytest
import torch
from model_parts import save_small_checkpoint

# The suite's models are tiny: one intra-op thread is faster than two fighting over small matmuls, and it leaves
# the other core to the Ray workers, ffmpeg and servers the tests start (12x faster on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def small_default_checkpoint(tmp_path_factory):
    """The pipeline's default model (AVATAR_RENDER_CHECKPOINT) for the whole session: a seeded random 64x64 model of
    the real classes, so jobs, the service and the CLI render in seconds. The bundled 128x128 model renders several
    times slower; the tests about it name it (`checkpoint=None`; the console script's test renders it). Set before
    Ray starts, so its workers inherit it."""
    directory = save_small_checkpoint(tmp_path_factory.mktemp("small-model"), size=64)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AVATAR_RENDER_CHECKPOINT", str(directory))
        yield directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with 2 CPUs, shared by every test that needs Ray (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port; yields StorageSettings pointing at it."""
    from moto.server import ThreadedMotoServer

    from pipeline.settings import StorageSettings

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield StorageSettings(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's moto server: returns its URI, "s3://<name>"."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def s3_client(settings):
    """A plain boto3 client for the moto server, to look at S3 independently of ObjectStore."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key.get_secret_value(),
    )


@pytest.fixture
def s3_raw(s3_server):
    return s3_client(s3_server)
