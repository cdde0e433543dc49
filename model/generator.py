"""Block-wise autoregressive generation: open a render, feed audio, pull video block by block.

DESIGN 3.3. Each concept has one home: the step plan (PSB) in `model.scheduler.StepPlan`, cache positions, eviction
and resets (URCR) in `model.kv_cache.KVCache`, the context writer (MCI) in `RenderSession._write_context`, and the
block loop in `RenderSession.block_passes`, a coroutine of network passes that `model.engine` runs, one row at a time
(`next_block`) or continuously batched with other rows (`Engine`).

A render's state between blocks is small and explicit (`RenderState`): the reference latent, the prompt, the RNG,
counters, the cache writes that built the current cache (replayed to rebuild it bit-identically) and the last few
clean latent frames (re-decoded to rebuild the VAE decoder's causal state). A fresh process restores it and continues
exactly where the original would have.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from model.audio_features import FrameFeatures, build_featurizer, num_latent_frames
from model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_files_inside,
    checkpoint_components,
    load_module_strict,
    missing_encoder,
    read_checkpoint,
    verify_checkpoint,
)
from model.config import Preset, RenderSettings, get_preset
from model.dit import CausalWanDiT
from model.engine import BlockPasses, Pass, run_block
from model.errors import ModelComponentError
from model.kv_cache import KVCache
from model.paste_back import PasteBack
from model.scheduler import FlowMatchSchedule, StepPlan
from model.text_encoder import NullTextEncoder, TextEncoder
from model.vae import StreamingDecoder, WanVAE, frames_to_tensor, tensor_to_frames

BUNDLED_MODEL = Path(__file__).parent / "weights" / "tiny"


def decoder_context_frames(vae: WanVAE) -> int:
    """Latent frames of history the VAE decoder's causal state depends on (an upper bound).

    Every causal conv looks (kernel_t - 1) steps back at its own frame rate; temporal upsamplers double the rate
    after them. Re-decoding this many latent frames from a cold decoder reproduces its state exactly.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    rate, frames = 1, 0.0
    for name, module in vae.model.decoder.named_modules():
        if isinstance(module, WanCausalConv3d):
            frames += (module.kernel_size[0] - 1) / rate
            if ".upsamplers." in name:  # the upsampler's time conv runs before its frame doubling
                rate *= 2
    return math.ceil(frames)


RANDOM_MODEL_SEED = 0

# Draws the next noise tensor of a shape (float32, CPU). Default: the render's seeded generator.
NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass
class VideoBlock:
    index: int
    first_frame: int
    frames: np.ndarray  # uint8 (N, H, W, 3)


@dataclass
class GeneratedBlock:
    """A block as the block loop leaves it: its clean latents and the video frames they become (`emit`)."""

    index: int
    first_frame: int
    num_frames: int  # video frames of this block, the last one trimmed to the audio
    latents: torch.Tensor  # (1, C, n, h, w)


@dataclass
class CacheWrite:
    """One cache-write pass, enough to replay it: what was written, at which timestep and positions, and for which
    frames (their audio and mask are recomputed from that)."""

    latents: torch.Tensor  # (1, C, n, h, w) as fed to the network (MCI-noised)
    timestep: float
    positions: torch.Tensor  # (n,)
    first_latent: int | None  # latent frame index of its first frame; None: the reference sink entry
    reset_before: bool = False  # a URCR reset came right before it (it is the re-write of the last frames)
    fills_sink: bool = False  # some of its frames went into the sink (kept in the journal across resets)


@dataclass
class RenderState:
    """Everything needed to continue a render in another process. Saved as safetensors + JSON."""

    meta: dict  # counters, settings, prompt, cache bookkeeping
    reference: torch.Tensor  # (1, C, 1, h, w) portrait latent
    rng: torch.Tensor  # torch.Generator state
    recent: torch.Tensor  # (1, C, k, h, w) last clean latent frames
    journal: list[CacheWrite] = field(default_factory=list)
    portrait: torch.Tensor | None = None  # (1, 3, 1, H, W) in [-1, 1], for the paste-back; None: the render pastes none

    @property
    def blocks_done(self) -> int:
        return self.meta["blocks_done"]

    @property
    def frames_done(self) -> int:
        return self.meta["frames_done"]

    def to_bytes(self) -> bytes:
        tensors = {"reference": self.reference, "rng": self.rng, "recent": self.recent}
        if self.portrait is not None:
            tensors["portrait"] = self.portrait
        for i, w in enumerate(self.journal):
            tensors[f"journal.{i}.latents"] = w.latents
            tensors[f"journal.{i}.positions"] = w.positions
        entries = [
            {"timestep": w.timestep, "first_latent": w.first_latent, "reset_before": w.reset_before,
             "fills_sink": w.fills_sink}
            for w in self.journal
        ]  # fmt: skip
        meta = dict(self.meta, journal=entries)
        return save_tensors({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> RenderState:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["meta"])
        entries = meta.pop("journal")
        journal = [
            CacheWrite(tensors[f"journal.{i}.latents"], e["timestep"], tensors[f"journal.{i}.positions"],
                       e["first_latent"], e["reset_before"], e["fills_sink"])
            for i, e in enumerate(entries)
        ]  # fmt: skip
        return cls(
            meta=meta,
            reference=tensors["reference"],
            rng=tensors["rng"],
            recent=tensors["recent"],
            journal=journal,
            portrait=tensors.get("portrait"),
        )


class AudioBuffer:
    """The stream's samples still needed: appends are amortised O(1), and read audio is dropped from the front,
    so memory and per-block cost stay constant however long the audio is."""

    def __init__(self):
        self._data = np.zeros(0, dtype=np.float32)
        self._size = 0
        self.start = 0  # stream index of the first sample held

    @property
    def end(self) -> int:
        """Stream index one past the last sample received."""
        return self.start + self._size

    @property
    def samples(self) -> np.ndarray:
        return self._data[: self._size]

    def append(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._size + samples.size > self._data.size:
            grown = np.zeros(max(2 * self._data.size, self._size + samples.size), dtype=np.float32)
            grown[: self._size] = self.samples
            self._data = grown
        self._data[self._size : self._size + samples.size] = samples
        self._size += samples.size

    def drop_before(self, index: int) -> None:
        drop = min(max(0, index - self.start), self._size)
        if drop * 2 < self._data.size:  # compact only when it frees at least half: amortised O(1)
            return
        self._data = self.samples[drop:].copy()
        self._size -= drop
        self.start += drop


class AvatarModel:
    """One resident model: DiT, VAE, audio featurizer and text encoder, loaded once and shared by renders."""

    def __init__(
        self,
        preset: Preset,
        dit: CausalWanDiT,
        vae: WanVAE,
        *,
        description: str,
        audio_model_dir: str | os.PathLike | None = None,
        text_model_dir: str | os.PathLike | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.preset = preset
        self.device = torch.device(device)
        self.dtype = dtype
        self.dit = dit.to(self.device, dtype).eval().requires_grad_(False)
        self.vae = vae.to(self.device, torch.float32).eval().requires_grad_(False)
        # Encoders that need weights of their own are None without them: such a model renders only from
        # precomputed features and text embeddings (`RenderSession.feed_features`), and says so otherwise.
        needs_audio_dir = preset.audio.encoder != "logmel"
        self.featurizer = (
            None if needs_audio_dir and audio_model_dir is None else build_featurizer(preset, audio_model_dir)
        )
        self.text_encoder: TextEncoder | NullTextEncoder | None
        if preset.text.encoder != "umt5":
            self.text_encoder = NullTextEncoder(preset.dit.text_dim, preset.text.max_length)
        elif text_model_dir is None:
            self.text_encoder = None
        else:
            self.text_encoder = TextEncoder(
                text_model_dir, preset.text.max_length, device=self.device, tokenizer_dir=tokenizer_dir
            )
        self.description = description
        self.schedule = FlowMatchSchedule(preset.generator.shift, preset.generator.num_train_timesteps)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        *,
        preset: str = "tiny",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        audio_model_dir: str | None = None,
        text_model_dir: str | None = None,
    ) -> AvatarModel:
        """A checkpoint directory (trained here, or built by `avatar-render import` with its encoders inside);
        None -> the bundled trained model for `tiny`, or a seeded random model of `preset` whose encoders come from
        the `*_dir` arguments. The model can render from speech and prompts, or this raises one
        `ModelComponentError` naming the missing or corrupt file and what to do."""
        path = Path(checkpoint) if checkpoint else BUNDLED_MODEL if preset == "tiny" else None
        if path is None:
            # Refused before building: a random 1.3B model costs gigabytes and most of a minute to allocate.
            error = missing_encoder(f"preset {preset!r} (random weights)", get_preset(preset),
                                    audio=audio_model_dir is not None, text=text_model_dir is not None)  # fmt: skip
            if error is not None:
                raise error
            model = cls.random(preset, seed=RANDOM_MODEL_SEED, device=device, dtype=dtype,
                               audio_model_dir=audio_model_dir, text_model_dir=text_model_dir)  # fmt: skip
            model.require_encoders(f"preset {preset!r} (random weights)")
            return model
        if not (path / CONFIG_FILE).exists():
            raise ModelComponentError(f"{path}: not an avatar-render checkpoint directory (no {CONFIG_FILE})")
        check_files_inside(path)  # what is read below is the directory's own files, never a link out of it
        verify_checkpoint(path)
        try:
            loaded_preset, modules, _ = read_checkpoint(path)
            dit, vae = CausalWanDiT(loaded_preset.dit), WanVAE(loaded_preset.vae)
            load_module_strict(dit, modules["dit"], f"{path / WEIGHTS_FILE} (dit)")
            load_module_strict(vae, modules["vae"], f"{path / WEIGHTS_FILE} (vae)")
        except KeyError as err:
            raise ModelComponentError(
                f"{path / WEIGHTS_FILE}: has no {err} weights; re-import the checkpoint"
            ) from None
        except (CheckpointError, OSError, safetensors.SafetensorError) as err:
            raise ModelComponentError(f"{err}") from None
        parts = checkpoint_components(path, loaded_preset)
        model = cls(
            loaded_preset,
            dit,
            vae,
            description="bundled tiny model" if path == BUNDLED_MODEL else f"checkpoint {path}",
            audio_model_dir=audio_model_dir or parts.audio_dir,
            text_model_dir=text_model_dir or parts.text_dir,
            tokenizer_dir=None if text_model_dir else parts.tokenizer_dir,
            device=device,
            dtype=dtype,
        )
        model.require_encoders(str(path))
        return model

    def require_encoders(self, where: str) -> None:
        """Raise `ModelComponentError` unless this model can read speech and prompts itself."""
        error = missing_encoder(
            where, self.preset, audio=self.featurizer is not None, text=self.text_encoder is not None
        )
        if error is not None:
            raise error

    @classmethod
    def random(cls, preset: str | Preset = "tiny", *, seed: int = 0, **kwargs) -> AvatarModel:
        """A seeded random model of the real classes: conditioning randomised too, so it reacts to its inputs."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        torch.manual_seed(seed)
        dit, vae = CausalWanDiT(preset.dit), WanVAE(preset.vae)
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if dit.is_conditioning_param(name):
                    p.normal_(0.0, 0.02)
        return cls(
            preset, dit, vae, description=f"random {preset.name} model (seed {seed}): no trained weights", **kwargs
        )

    def open(
        self,
        portrait: np.ndarray,
        prompt: str | None = None,
        settings: RenderSettings | None = None,
        *,
        noise: NoiseSource | None = None,
    ) -> RenderSession:
        """Start a render of `portrait` (uint8 H, W, 3 at the preset's size). `noise` replaces the seeded generator
        (reference checks feed another implementation's draws); such a render cannot be saved and restored."""
        settings = settings or RenderSettings()
        preset = self._preset_for(settings)
        if portrait.shape != (preset.video.height, preset.video.width, 3) or portrait.dtype != np.uint8:
            raise ValueError(
                f"portrait must be uint8 {(preset.video.height, preset.video.width, 3)}, "
                f"got {portrait.dtype} {portrait.shape}"
            )
        with torch.no_grad():
            video = frames_to_tensor(portrait[None]).to(self.device)  # (1, 3, 1, H, W)
            reference = self.vae.encode(video).to(self.dtype)
        return self.open_latent(reference, prompt, settings, noise=noise, portrait=video)

    def open_latent(
        self,
        reference: torch.Tensor,
        prompt: str | None = None,
        settings: RenderSettings | None = None,
        *,
        noise: NoiseSource | None = None,
        portrait: torch.Tensor | None = None,
    ) -> RenderSession:
        """Start a render from the portrait's latent (1, C, 1, h, w) directly (training, reference checks). Without
        `portrait` (its pixels, (1, 3, 1, H, W) in [-1, 1]) the preset's paste-back has nothing to paste and is off."""
        settings = settings or RenderSettings()
        rng = torch.Generator().manual_seed(settings.seed)
        preset = self._preset_for(settings)
        return RenderSession(self, preset, settings, prompt, reference.to(self.dtype), rng, noise, portrait=portrait)

    def restore(self, state: RenderState, prompt: str | None = None) -> RenderSession:
        """Continue a render from its state; feed its audio again from sample 0 (the cache is rebuilt from it)."""
        settings = RenderSettings.model_validate(state.meta["settings"])
        prompt = state.meta.get("prompt") if prompt is None else prompt
        rng = torch.Generator()
        rng.set_state(state.rng)
        reference = state.reference.to(self.device, self.dtype)
        portrait = None if state.portrait is None else state.portrait.to(self.device)
        preset = self._preset_for(settings)
        return RenderSession(self, preset, settings, prompt, reference, rng, restore_from=state, portrait=portrait)

    def _preset_for(self, settings: RenderSettings) -> Preset:
        preset = self.preset
        if settings.height or settings.width:
            preset = preset.with_resolution(
                settings.height or preset.video.height, settings.width or preset.video.width
            )
        gen = preset.generator.model_copy(
            update={
                k: v for k, v in {"step_plan": settings.step_plan, "t_mci": settings.t_mci}.items() if v is not None
            }
        )
        if not settings.urcr:
            gen = gen.model_copy(update={"horizon_frames": preset.dit.rope_max_positions})
        return preset.model_copy(update={"generator": type(preset.generator).model_validate(gen.model_dump())})


class RenderSession:
    """One render: audio in, video blocks out. Not thread-safe; one session per row."""

    def __init__(
        self,
        model: AvatarModel,
        preset: Preset,
        settings: RenderSettings,
        prompt: str | None,
        reference: torch.Tensor,
        rng: torch.Generator,
        noise: NoiseSource | None = None,
        restore_from: RenderState | None = None,
        portrait: torch.Tensor | None = None,
    ):
        gen = preset.generator
        self.model, self.preset, self.settings = model, preset, settings
        self.prompt = prompt if prompt else None  # None or "": the preset's default prompt
        self.gen = gen
        self.plan = StepPlan(gen.step_plan)
        self.schedule = model.schedule
        self.fps = preset.video.fps
        self.stride = preset.vae.temporal_stride
        self.sample_rate = preset.audio.sample_rate
        self.reference = reference
        self.rng = rng
        self._draw = noise
        self.audio = AudioBuffer()
        self.audio_final = False
        self.total_frames: int | None = None
        self.clip_features: FrameFeatures | None = None  # whole-clip audio features (omniavatar, precomputed)
        self.blocks_done = 0
        self.frames_done = 0
        self.latents_done = 0
        self.journal: list[CacheWrite] = []  # the writes the current cache was built from, in order
        self.decoder_context = decoder_context_frames(model.vae)
        self.recent = reference[:, :, :0]  # last clean latent frames (for URCR and decoder warm-up)
        self._restore = restore_from  # replayed before the first block, once the audio is there

        dit = model.dit
        if model.text_encoder is None:
            raise missing_encoder(model.description, preset, audio=True, text=False)
        text = model.text_encoder.encode(self.prompt or preset.text.default_prompt)
        self.text = dit.embed_text(text.to(model.device, model.dtype))
        self.cache: KVCache = dit.new_cache(
            tokens_per_frame=preset.tokens_per_frame,
            sink_frames=gen.sink_frames,
            window_frames=gen.window_frames,
            horizon_frames=gen.horizon_frames,
        )
        self.decoder = StreamingDecoder(model.vae, gen.deflicker if settings.deflicker else None)
        self.portrait = portrait
        self.paste_back: PasteBack | None = None
        if portrait is not None and settings.paste_back and gen.paste_back.threshold > 0:
            # The portrait's decode on a stream of its own: the very frame a pinned frame 0 decodes to.
            decoded = StreamingDecoder(model.vae).decode_block(reference.float())
            self.paste_back = PasteBack(portrait.float(), decoded, gen.paste_back)
        if restore_from is not None:
            meta = restore_from.meta
            self.blocks_done, self.frames_done = meta["blocks_done"], meta["frames_done"]
            self.latents_done = meta["latents_done"]
            self.recent = restore_from.recent.to(model.device, model.dtype)

    # -- audio in --------------------------------------------------------------------------------------------

    def feed_audio(self, samples: np.ndarray, final: bool = False) -> None:
        """Append float32 mono samples at the preset's rate. After a restore, feed from sample 0 again."""
        if self.audio_final:
            raise RuntimeError("audio was already marked final")
        if self.model.featurizer is None:
            raise missing_encoder(self.model.description, self.preset, audio=False, text=True)
        self.audio.append(samples)
        self._drop_read_audio()
        if final:
            if self.audio.end == 0:
                raise ValueError("zero-length audio: nothing to render")
            self.audio_final = True
            self.total_frames = math.ceil(self.audio.end * self.fps / self.sample_rate)
            if self.model.featurizer.whole_clip:
                self.clip_features = self.model.featurizer.clip_features(self.audio.samples, self._padded_frames())
                self.audio = AudioBuffer()  # the clip features keep the (padded) samples they read

    def feed_features(self, features: torch.Tensor, total_frames: int | None = None) -> None:
        """Per-video-frame audio features (T, feature_dim) computed elsewhere, instead of audio; the video is
        `total_frames` long (default: T). They must cover the whole blocks that cover the video (its last block's
        frames past `total_frames` are trimmed)."""
        if self.audio_final:
            raise RuntimeError("audio was already given")
        self.audio_final = True
        self.total_frames = total_frames or features.shape[0]
        if features.shape[0] < self._padded_frames():
            raise ValueError(f"features cover {features.shape[0]} video frames; the blocks of a {self.total_frames}-"
                             f"frame video need {self._padded_frames()}")  # fmt: skip
        self.clip_features = FrameFeatures(
            features, self.preset.audio.front_padding, self.preset.audio.lookahead_frames
        )

    def _padded_frames(self) -> int:
        """Video frames of the whole blocks that cover the audio: the last block is padded, its video trimmed."""
        n = self.gen.frames_per_block
        latents = -(-num_latent_frames(self.total_frames, self.stride) // n) * n
        return self._video_frames_through(latents)

    def _drop_read_audio(self) -> None:
        """Forget audio no later block reads (the oldest is a URCR reset re-writing the last frames)."""
        if self._restore is not None or self.clip_features is not None or self.model.featurizer.whole_clip:
            return  # a restore replays old writes first; whole-clip features read the whole audio
        first_latent = max(0, self.latents_done - self.gen.reset_context_frames)
        self.audio.drop_before(self.model.featurizer.first_sample_needed(first_latent, self.stride))

    @property
    def finished(self) -> bool:
        """Every block has been generated (its frames may still wait for `emit`)."""
        return self.total_frames is not None and self.frames_done >= self.total_frames

    def ready(self) -> bool:
        """Whether the next block can be generated now (its audio has arrived, and blocks remain)."""
        if self.finished:
            return False
        if self.audio_final:
            return True
        if self.model.featurizer is None or self.model.featurizer.whole_clip:
            return False
        video_end = self._video_frames_through(self.latents_done + self.gen.frames_per_block)
        heard_until = video_end + self.preset.audio.lookahead_frames  # a block's features read this far
        return self.audio.end >= math.ceil(heard_until * self.sample_rate / self.fps)

    # -- video out -------------------------------------------------------------------------------------------

    def _video_frames_through(self, latent_end: int) -> int:
        """Video frames covered by latent frames [0, latent_end): 1 + stride * (latent_end - 1)."""
        return 1 + self.stride * (latent_end - 1) if latent_end > 0 else 0

    def next_block(self) -> VideoBlock | None:
        """The next block, or None while its audio has not arrived (and at the end)."""
        if not self.ready():
            return None
        with torch.no_grad():
            return self.emit(run_block(self.model.dit, self.block_passes()))

    def __iter__(self):
        while (block := self.next_block()) is not None:
            yield block

    def emit(self, block: GeneratedBlock) -> VideoBlock:
        """Decode a generated block into its video frames. Blocks must be emitted in order; this touches only the
        decoder, so it may run on another thread while the next block is generated."""
        video = self.decoder.decode_block(block.latents.float())
        if self.paste_back is not None:
            video = self.paste_back(video)
        frames = tensor_to_frames(video[0])
        return VideoBlock(index=block.index, first_frame=block.first_frame, frames=frames[: block.num_frames])

    def next_latents(self, exit_step: int | None = None) -> torch.Tensor:
        """Training rollouts: the next block's latents without decoding (see `block_passes`). Needs final audio."""
        if not self.audio_final:
            raise RuntimeError("training rollouts need the whole audio (feed_audio(..., final=True))")
        return run_block(self.model.dit, self.block_passes(exit_step)).latents

    # -- the block loop --------------------------------------------------------------------------------------

    def block_passes(self, exit_step: int | None = None) -> BlockPasses:
        """The next block as a coroutine of network passes (run by `model.engine`); returns its clean latents
        as a GeneratedBlock: the sink or a restore first, URCR if the block would pass the horizon, the PSB plan's
        denoising steps (block 0's first frame pinned to the portrait where the preset says so), then the MCI
        context write.

        `exit_step` (training, Self-Forcing): stop at that denoising step and return its x0 prediction, computed with
        gradients if they are enabled; every earlier step and the cache write run without gradients.
        """
        if self._restore is not None:
            yield from self._replay(self._restore)
        elif not self.journal and self.gen.sink == "reference":
            yield from self._write_reference_sink()
        n, first = self.gen.frames_per_block, self.latents_done
        if not self.cache.fits(n):
            yield from self._reset_cache()
        positions = self.cache.allocate(n)
        audio, cond = self._audio_features(first, n), self._cond(first, n)
        pin = self.gen.pin_first_frame and first == 0
        shape = (1, self.preset.dit.latent_channels, n, self.preset.latent_height, self.preset.latent_width)
        x = self._noise(shape)
        sigmas = self.schedule.sigmas(self.plan.steps(self.blocks_done))
        for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
            if pin:
                x = torch.cat([self.reference, x[:, :, 1:]], dim=2)
            exiting = exit_step is not None and step == exit_step
            timestep = float(self.schedule.timestep(sigma))
            velocity = yield self._pass(x, timestep, positions, cond, audio, write=False, grad=exiting)
            if exiting:
                x = self.schedule.predict_x0(x, velocity, sigma)
                break
            if self.gen.sampler == "euler":
                x = x + (sigma_next - sigma) * velocity
            else:  # few-step student: predict x0, re-noise to the next level with fresh noise
                x0 = self.schedule.predict_x0(x, velocity, sigma)
                x = self.schedule.add_noise(x0, self._noise(x0.shape), sigma_next) if sigma_next > 0 else x0
        clean = torch.cat([self.reference, x[:, :, 1:]], dim=2) if pin else x
        self.latents_done = first + n
        self.blocks_done += 1
        self.recent = torch.cat([self.recent, clean.detach()], dim=2)[:, :, -self._recent_frames() :]
        video_end = self._video_frames_through(self.latents_done)
        if self.total_frames is not None:
            video_end = min(video_end, self.total_frames)
        block = GeneratedBlock(self.blocks_done - 1, self.frames_done, video_end - self.frames_done, clean)
        self.frames_done = video_end
        if not self.finished:  # the last block's context is never read
            yield from self._write_context(clean.detach(), positions, first)
        self._drop_read_audio()
        return block

    def _pass(self, x, timestep, positions, cond, audio, *, write: bool, grad: bool = False) -> Pass:
        return Pass(x, timestep, positions, cond, audio, self.text, self.cache, write, grad)

    def _audio_features(self, first_latent: int, n: int) -> torch.Tensor:
        window = self.preset.dit.audio_window
        if self.clip_features is not None:
            feats = self.clip_features.block_features(first_latent, n, self.stride, window)
        else:
            feats = self.model.featurizer.block_features(
                self.audio.samples, first_latent, n, self.stride, offset=self.audio.start
            )
        return feats.unsqueeze(0).to(self.model.device, self.model.dtype)

    def _cond(self, first_latent: int | None, n: int) -> torch.Tensor:
        """reference latent | mask for `n` frames from `first_latent` (None: the reference sink entry)."""
        if self.gen.mask == "reference_entry":
            marks = [1.0 if first_latent is None else 0.0] * n
        else:  # OmniAvatar/LiveTalk: 0 at the portrait's frame (latent 0), 1 at every frame to generate
            marks = [0.0 if first_latent + i == 0 else 1.0 for i in range(n)]
        ref = self.reference.expand(-1, -1, n, -1, -1)
        mask = torch.tensor(marks, device=ref.device, dtype=ref.dtype).view(1, 1, n, 1, 1)
        return torch.cat([ref, mask.expand(1, 1, n, *ref.shape[3:])], dim=1)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        # Drawn on the CPU so a render is reproducible on any device.
        noise = self._draw(tuple(shape)) if self._draw else torch.randn(shape, generator=self.rng, dtype=torch.float32)
        return noise.to(self.model.device, self.model.dtype)

    def _write(self, x: torch.Tensor, timestep: float, positions: torch.Tensor, first_latent: int | None,
               reset_before: bool = False):  # fmt: skip
        """One cache-write pass of `x`, committed and journaled."""
        n = x.shape[2]
        audio = self._silence(n) if first_latent is None else self._audio_features(first_latent, n)
        yield self._pass(x, timestep, positions, self._cond(first_latent, n), audio, write=True)
        fills_sink = self.cache.sink_filled < self.cache.sink_frames
        self.cache.commit(n)
        latents = x.detach().to("cpu", torch.float32, copy=True)
        entry = CacheWrite(latents, timestep, positions.cpu(), first_latent, reset_before, fills_sink)
        self.journal.append(entry)

    def _silence(self, n: int) -> torch.Tensor:
        cfg = self.model.dit.cfg
        return torch.zeros(1, n, cfg.audio_window, cfg.audio_feature_dim, device=self.model.device,
                           dtype=self.model.dtype)  # fmt: skip

    def _write_reference_sink(self):
        """The portrait's latent as the permanent sink entry: position 0, t = 0, silent audio, mask 1."""
        yield from self._write(self.reference, 0.0, self.cache.allocate(1), None)

    def _write_context(self, clean: torch.Tensor, positions: torch.Tensor, first_latent: int):
        """MCI: write frames into the cache corrupted at t_mci (t_mci = 0: the clean frames, Self-Forcing)."""
        t_mci = self.gen.t_mci
        x = clean
        if t_mci > 0:
            x = self.schedule.add_noise(clean, self._noise(clean.shape), float(self.schedule.sigma(t_mci)))
        yield from self._write(x, t_mci, positions, first_latent)

    def _reset_cache(self):
        """URCR: keep the sink, re-write the last frames right after it."""
        m = self.gen.reset_context_frames
        self.cache.reset()
        self.journal = [w for w in self.journal if w.fills_sink]  # the sink's writes rebuild it on a restore
        if m == 0:
            return
        context = self.recent[:, :, -m:]
        first = self.latents_done - context.shape[2]
        positions = self.cache.allocate(context.shape[2])
        t_mci = self.gen.t_mci
        x = context
        if t_mci > 0:
            x = self.schedule.add_noise(context, self._noise(context.shape), float(self.schedule.sigma(t_mci)))
        yield from self._write(x, t_mci, positions, first, reset_before=True)

    def _recent_frames(self) -> int:
        return max(self.gen.reset_context_frames, self.decoder_context)

    # -- state -----------------------------------------------------------------------------------------------

    def state(self) -> RenderState:
        """The state at this block boundary."""
        if self._draw is not None:
            raise RuntimeError("a render with an external noise source cannot be saved")
        meta = {
            "version": 3,  # 3: the portrait travels with a render that pastes it back
            "preset": self.preset.name,
            "settings": self.settings.model_dump(mode="json"),
            "prompt": self.prompt,
            "blocks_done": self.blocks_done,
            "frames_done": self.frames_done,
            "latents_done": self.latents_done,
            "cache_next_position": self.cache.next_position,
            "cache_resets": self.cache.resets,
        }
        return RenderState(
            meta=meta,
            reference=self.reference.detach().cpu().float(),
            rng=self.rng.get_state(),
            recent=self.recent.detach().cpu().float(),
            journal=list(self.journal),
            # Only a render that pastes needs its portrait back (at 512x512 it would be 3 MB in every segment's state).
            portrait=None if self.paste_back is None else self.portrait.detach().cpu().float(),
        )

    def _replay(self, state: RenderState):
        """Rebuild the cache and the decoder exactly as they were when `state` was taken: the journal's writes are
        run again in order (with a reset where one came between them); the decoder re-decodes the last frames."""
        dev, dt = self.model.device, self.model.dtype
        for w in state.journal:
            if w.reset_before:
                self.cache.reset()
            self.cache.next_position = int(w.positions[0])
            positions = self.cache.allocate(w.latents.shape[2])
            yield from self._write(w.latents.to(dev, dt), w.timestep, positions, w.first_latent, w.reset_before)
        self.cache.next_position = state.meta["cache_next_position"]
        self.cache.resets = state.meta["cache_resets"]
        # The decoder's causal state depends only on the last `decoder_context` latent frames: re-decode them.
        # (If the render is shorter than that, `recent` is its whole history and the warm-up is exact anyway.)
        warmup = self.recent[:, :, -self.decoder_context :]
        if warmup.shape[2]:
            self.decoder.decode_block(warmup.float())
        self._restore = None
        self._drop_read_audio()
