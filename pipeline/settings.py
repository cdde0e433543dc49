"""Settings of a pipeline run: environment variables `AVATAR_RENDER_*` (nested with `__`) and `.env`.

Objects are built by the caller and passed down explicitly (to run_job, the render actors, the stores);
nothing reads a global. Example: `AVATAR_RENDER_STORAGE__ENDPOINT_URL=http://127.0.0.1:9000`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.media.image import MAX_PORTRAIT_PIXELS, MIN_PORTRAIT_SIDE

if TYPE_CHECKING:
    from model.config import Preset

MIB = 1024 * 1024
GIB = 1024 * MIB
S3_MIN_PART = 5 * MIB  # S3 rejects smaller parts (except the last)
# Default segment length: a crashed row loses at most this much video's work; a row keeps a segment object per this.
SEGMENT_SECONDS = 4.0


class StorageSettings(BaseModel):
    """Object storage: `file://` needs nothing; `s3://` talks to AWS or any S3-compatible endpoint."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = None  # None: AWS; e.g. "http://127.0.0.1:9000" for MinIO or moto
    region: str = "us-east-1"
    access_key_id: str | None = None  # None: boto3's usual credential chain
    secret_access_key: SecretStr | None = None  # never printed, logged or returned by the service
    multipart_threshold: int = Field(default=64 * MIB, ge=1)  # bytes; files this large go up in parts
    multipart_chunk_size: int = Field(default=16 * MIB, ge=S3_MIN_PART)
    max_attempts: int = Field(default=5, ge=1)  # tries per request, first included; botocore "standard" retries
    # A transfer that still fails on a connection error or a 5xx starts again, for up to this long (an endpoint
    # restarting, a network blip); 0 turns it off.
    retry_seconds: float = Field(default=60.0, ge=0)


class LimitSettings(BaseModel):
    """Refuse inputs that would not fit the machine, before allocating them or spending a render on them."""

    model_config = ConfigDict(frozen=True)

    max_manifest_bytes: int = Field(default=64 * MIB, gt=0)  # a manifest object; read at most this much
    max_input_bytes: int = Field(default=4 * GIB, gt=0)  # one portrait or audio object, checked before download
    max_audio_seconds: float = Field(default=4 * 3600.0, gt=0)  # decoding stops here (16 kHz float32: 0.9 GB)
    max_portrait_pixels: int = Field(default=MAX_PORTRAIT_PIXELS, gt=0)  # width x height, checked before decoding
    min_portrait_side: int = Field(default=MIN_PORTRAIT_SIDE, gt=0)  # px; smaller portraits hold no face to animate
    max_prompt_chars: int = Field(default=4000, gt=0)
    max_height: int = Field(default=1080, gt=0)
    max_width: int = Field(default=1920, gt=0)
    max_steps: int = Field(default=64, gt=0)  # per block, in a per-row step plan


class PipelineSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AVATAR_RENDER_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True
    )

    storage: StorageSettings = Field(default_factory=StorageSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else start a local Ray
    num_actors: int = Field(default=1, ge=1)  # render actors, each holding one resident model
    actor_num_cpus: float = Field(default=1.0, gt=0)  # CPUs reserved per render actor (threads torch may use)
    io_num_cpus: float = Field(default=0.25, gt=0)  # CPUs reserved per fetch/write task (they mostly wait)
    # K: blocks per stored segment (the unit of resume). None: the blocks of about SEGMENT_SECONDS of video at the
    # rendering model's block size (`segment_blocks_for`), so a segment is seconds long whatever the model.
    segment_blocks: int | None = Field(default=None, ge=1, le=100_000)
    # Rows one render actor keeps in flight, rendered together by its engine (continuous batching).
    rows_per_actor: int = Field(default=1, ge=1, le=64)
    # Decode and encode block k on a second thread while block k+1 is generated ("auto": on a GPU only; on a
    # 2-core CPU the threads would fight over the same cores).
    overlap_decode: Literal["auto", "on", "off"] = "auto"
    checkpoint: str | None = None  # None: the bundled default model; a directory, or its s3:// URI
    # Where each node keeps its verified copy of an s3:// checkpoint (None: ~/.cache/avatar-render/checkpoints).
    model_cache_dir: str | None = None
    preset: str = "tiny"  # names the model only when no checkpoint is given: a checkpoint brings its own
    device: Literal["cpu", "cuda"] = "cpu"  # "cuda": one GPU per render actor
    # The DiT's dtype: "auto" is bfloat16 on a GPU (as LiveTalk renders), float32 on a CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Quality metrics (model.eval: lip-sync vs. the speech envelope, identity, seams) for the report; they stream the
    # output but cost CPU time and hold the row's audio, so rows longer than this many seconds skip them (0: off).
    metrics_max_seconds: float = Field(default=600.0, ge=0)

    def segment_blocks_for(self, preset: Preset) -> int:
        """K for a model: `segment_blocks`, or the blocks of about SEGMENT_SECONDS of its video."""
        if self.segment_blocks is not None:
            return self.segment_blocks
        block_frames = preset.generator.frames_per_block * preset.vae.temporal_stride
        return max(1, round(SEGMENT_SECONDS * preset.video.fps / block_frames))

    def torch_dtype(self):
        import torch

        name = ("bfloat16" if self.device == "cuda" else "float32") if self.dtype == "auto" else self.dtype
        return getattr(torch, name)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        from model.config import get_preset

        get_preset(name)  # ValueError naming the known presets
        return name
