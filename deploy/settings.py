"""Settings of the HTTP job service: environment variables `AVATAR_RENDER_*` and `.env`, like the pipeline's.

The service embeds the pipeline's own settings (storage, Ray address, actor pool size, per-row limits), read
from the same variables, e.g. `AVATAR_RENDER_NUM_ACTORS=2`, `AVATAR_RENDER_STORAGE__ENDPOINT_URL=...`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.settings import PipelineSettings
from pipeline.uri import normalize_uri

MIB = 1024 * 1024


class ConsoleSettings(BaseModel):
    """The web console (`/console`): `AVATAR_RENDER_CONSOLE__*`."""

    model_config = ConfigDict(frozen=True)

    throughput_interval_s: float = Field(default=10.0, gt=0, le=3600)  # one point of the throughput chart
    throughput_hours: float = Field(default=6.0, gt=0, le=48)  # how far back the chart reaches (kept in memory)
    thumbnail_height: int = Field(default=96, ge=16, le=360)  # pixels; a strip is three frames side by side
    thumbnail_cache_bytes: int = Field(default=64 * MIB, ge=0)  # on disk under <state_dir>/thumbnails, LRU
    thumbnails_waiting: int = Field(default=64, ge=0, le=10_000)  # strips waiting for an ffmpeg turn; more: 503
    rows_per_page: int = Field(default=100, ge=1, le=1000)
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)  # a login lasts this long, then the form again
    # Reached over https through a proxy that terminates TLS: the session cookie is always `Secure` (without it,
    # only when the request itself is https).
    behind_tls: bool = False


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AVATAR_RENDER_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer token for every /v1 route. Required unless `host` is a loopback address.
    auth_token: SecretStr | None = None
    # Host names (the Host header, any port) the service answers to; `*.example.com` matches its subdomains.
    # Unset: without a token only localhost, 127.0.0.1 and [::1] (so that a web page whose DNS name is rebound
    # to 127.0.0.1 cannot drive a tokenless service from a browser); with a token any name.
    allowed_hosts: list[str] | None = None
    state_dir: Path = Path("service-state")  # the job store lives here; keep it on a persistent volume
    # Where jobs may write: URI prefixes (`file:///data/out`, `s3://bucket/renders`). Empty: only under
    # `<state_dir>/outputs`. A job's output must lie under one of them.
    output_roots: list[str] = Field(default_factory=list)
    # Where jobs may read manifests, row media and checkpoints from. Empty: anywhere the service can read.
    input_roots: list[str] = Field(default_factory=list)
    max_rows_per_job: int = Field(default=10_000, ge=1)
    max_request_bytes: int = Field(default=4 * MIB, ge=1)
    max_pending_jobs: int = Field(default=100, ge=1)  # queued + running; more is refused with 429
    max_actors_per_job: int = Field(default=16, ge=1)
    concurrent_jobs: int = Field(default=1, ge=1)  # jobs run at once; each shares the actor pool settings
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @property
    def max_audio_seconds_per_row(self) -> float:
        """Enforced by the pipeline per row (the row fails with an input error), set by
        `AVATAR_RENDER_LIMITS__MAX_AUDIO_SECONDS`."""
        return self.pipeline.limits.max_audio_seconds

    @property
    def bearer_token(self) -> bytes | None:
        """The token every guarded request must present, or None when the service has none."""
        secret = self.auth_token.get_secret_value() if self.auth_token else ""
        return secret.encode() if secret else None

    def effective_allowed_hosts(self) -> list[str]:
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        if self.bearer_token is not None:
            return ["*"]
        return list(dict.fromkeys(["localhost", "127.0.0.1", "[::1]", self.host]))

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _token_unless_loopback(self) -> ServiceSettings:
        if not self.is_loopback and not (self.auth_token and self.auth_token.get_secret_value()):
            raise ValueError(
                f"host {self.host!r} is not a loopback address, so the service requires a bearer token: "
                "set AVATAR_RENDER_AUTH_TOKEN (or --token), or bind to 127.0.0.1"
            )
        if self.bearer_token is None and "*" in (self.allowed_hosts or []):
            raise ValueError(
                "allowed_hosts '*' without a token would let any web page a local browser opens drive the service "
                "(DNS rebinding): name the hosts, or set AVATAR_RENDER_AUTH_TOKEN"
            )
        return self

    def effective_output_roots(self) -> list[str]:
        return list(self.output_roots) or [normalize_uri(str(self.state_dir / "outputs"))]
