"""Block-wise autoregressive generation: open a render, feed audio, pull video block by block.

DESIGN 3.3. Each concept has one home: the step plan (PSB) in `model.scheduler.StepPlan`, cache positions and resets
(URCR) in `model.kv_cache.KVCache`, and the context writer (MCI) in `RenderSession._write_context` below.

A render's state between blocks is small and explicit (`RenderState`): the reference latent, the prompt, the RNG,
counters, the cache writes since the last reset (replayed to rebuild the cache bit-identically) and the last few
clean latent frames (re-decoded to rebuild the VAE decoder's causal state). A fresh process restores it and continues
exactly where the original would have.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, field_validator
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from model.audio_features import build_featurizer
from model.checkpoint import load_module_strict, read_checkpoint
from model.config import Preset, get_preset
from model.dit import CausalWanDiT
from model.kv_cache import KVCache
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


class RenderSettings(BaseModel):
    """Per-render overrides of the preset's generator settings."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    step_plan: tuple[int, ...] | None = None  # PSB; "8,6,4", [8, 6, 4] and 4 are read by StepPlan.parse
    t_mci: float | None = None
    height: int | None = None
    width: int | None = None
    # Ablation only: False lets temporal positions grow past the trained horizon, up to the end of the RoPE table
    # (`rope_max_positions`), where a reset is still forced because no later position exists.
    urcr: bool = True
    # Measurement only: False gives the decoder's frames without the preset's deflicker (generator.deflicker).
    deflicker: bool = True

    @field_validator("step_plan", mode="before")
    @classmethod
    def _parse_step_plan(cls, value):
        return None if value is None else StepPlan.parse(value).plan


@dataclass
class VideoBlock:
    index: int
    first_frame: int
    frames: np.ndarray  # uint8 (N, H, W, 3)


@dataclass
class CacheWrite:
    """One cache-write pass, enough to replay it: what was written, at which timestep and positions."""

    latents: torch.Tensor  # (1, C, n, h, w) as fed to the network (MCI-noised)
    timestep: float
    positions: torch.Tensor  # (n,)
    audio: torch.Tensor  # (1, n, A, D)


@dataclass
class RenderState:
    """Everything needed to continue a render in another process. Saved as safetensors + JSON."""

    meta: dict  # counters, settings, prompt, cache bookkeeping
    reference: torch.Tensor  # (1, C, 1, h, w) portrait latent
    rng: torch.Tensor  # torch.Generator state
    recent: torch.Tensor  # (1, C, k, h, w) last clean latent frames
    journal: list[CacheWrite] = field(default_factory=list)

    @property
    def blocks_done(self) -> int:
        return self.meta["blocks_done"]

    @property
    def frames_done(self) -> int:
        return self.meta["frames_done"]

    def to_bytes(self) -> bytes:
        tensors = {"reference": self.reference, "rng": self.rng, "recent": self.recent}
        for i, w in enumerate(self.journal):
            tensors[f"journal.{i}.latents"] = w.latents
            tensors[f"journal.{i}.positions"] = w.positions
            tensors[f"journal.{i}.audio"] = w.audio
        meta = dict(self.meta, journal_timesteps=[w.timestep for w in self.journal])
        blob = save_tensors({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})
        return blob

    @classmethod
    def from_bytes(cls, data: bytes) -> RenderState:
        tensors = load_tensors(data)
        header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["meta"])
        timesteps = meta.pop("journal_timesteps")
        journal = [
            CacheWrite(
                tensors[f"journal.{i}.latents"], t, tensors[f"journal.{i}.positions"], tensors[f"journal.{i}.audio"]
            )
            for i, t in enumerate(timesteps)
        ]
        return cls(
            meta=meta, reference=tensors["reference"], rng=tensors["rng"], recent=tensors["recent"], journal=journal
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> RenderState:
        return cls.from_bytes(Path(path).read_bytes())


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
        audio_model_dir: str | None = None,
        text_model_dir: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.preset = preset
        self.device = torch.device(device)
        self.dtype = dtype
        self.dit = dit.to(self.device, dtype).eval().requires_grad_(False)
        self.vae = vae.to(self.device, torch.float32).eval().requires_grad_(False)
        self.featurizer = build_featurizer(preset, audio_model_dir)
        if preset.text.encoder == "umt5":
            if text_model_dir is None:
                raise ValueError(f"preset {preset.name} needs a local umT5 directory (text_model_dir)")
            self.text_encoder = TextEncoder(text_model_dir, preset.text.max_length, device=self.device)
        else:
            self.text_encoder = NullTextEncoder(preset.dit.text_dim, preset.text.max_length)
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
        """Our checkpoint directory; None -> the bundled trained model, or a seeded random one if none ships."""
        path = Path(checkpoint) if checkpoint else BUNDLED_MODEL if preset == "tiny" else None
        if path is not None and (path / "config.json").exists():
            loaded_preset, modules, _ = read_checkpoint(path)
            dit, vae = CausalWanDiT(loaded_preset.dit), WanVAE(loaded_preset.vae)
            load_module_strict(dit, modules["dit"], f"{path} (dit)")
            load_module_strict(vae, modules["vae"], f"{path} (vae)")
            description = "bundled tiny model" if path == BUNDLED_MODEL else f"checkpoint {path}"
            return cls(
                loaded_preset,
                dit,
                vae,
                description=description,
                audio_model_dir=audio_model_dir,
                text_model_dir=text_model_dir,
                device=device,
                dtype=dtype,
            )
        if checkpoint:
            raise FileNotFoundError(f"{checkpoint}: no avatar-render checkpoint there (config.json missing)")
        return cls.random(
            preset,
            seed=RANDOM_MODEL_SEED,
            device=device,
            dtype=dtype,
            audio_model_dir=audio_model_dir,
            text_model_dir=text_model_dir,
        )

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
        self, portrait: np.ndarray, prompt: str | None = None, settings: RenderSettings | None = None
    ) -> RenderSession:
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
        rng = torch.Generator().manual_seed(settings.seed)
        return RenderSession(self, preset, settings, prompt, reference, rng)

    def restore(self, state: RenderState, prompt: str | None = None) -> RenderSession:
        settings = RenderSettings.model_validate(state.meta["settings"])
        prompt = state.meta.get("prompt") if prompt is None else prompt
        rng = torch.Generator()
        rng.set_state(state.rng)
        session = RenderSession(
            self,
            self._preset_for(settings),
            settings,
            prompt,
            state.reference.to(self.device, self.dtype),
            rng,
            restore_from=state,
        )
        return session

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
        restore_from: RenderState | None = None,
    ):
        gen = preset.generator
        if gen.sink_frames != 1:
            raise ValueError("the reference sink is one latent frame (one portrait)")
        self.model, self.preset, self.settings, self.prompt = model, preset, settings, prompt
        self.gen = gen
        self.plan = StepPlan(gen.step_plan)
        self.schedule = model.schedule
        self.fps = preset.video.fps
        self.stride = preset.vae.temporal_stride
        self.sample_rate = preset.audio.sample_rate
        self.reference = reference
        self.rng = rng
        self.audio = AudioBuffer()
        self.audio_final = False
        self.total_frames: int | None = None
        self.blocks_done = 0
        self.frames_done = 0
        self.latents_done = 0
        self.blocks_rendered_here = 0  # blocks generated by this process (restores skip the earlier ones)
        self.journal: list[CacheWrite] = []
        self.decoder_context = decoder_context_frames(model.vae)
        self.recent = reference[:, :, :0]  # last clean latent frames (for URCR and decoder warm-up)

        dit = model.dit
        self.text = dit.embed_text(model.text_encoder.encode(prompt or "").to(model.device, model.dtype))
        self.cache: KVCache = dit.new_cache(
            batch=1,
            tokens_per_frame=preset.tokens_per_frame,
            sink_frames=gen.sink_frames,
            window_frames=gen.window_frames,
            horizon_frames=gen.horizon_frames,
        )
        self.decoder = StreamingDecoder(model.vae, gen.deflicker if settings.deflicker else None)
        with torch.no_grad():
            self._write_sink()
            if restore_from is not None:
                self._replay(restore_from)

    # -- audio in --------------------------------------------------------------------------------------------

    def feed_audio(self, samples: np.ndarray, final: bool = False) -> None:
        """Append float32 mono samples at the preset's rate. After a restore, feed from sample 0 again."""
        if self.audio_final:
            raise RuntimeError("audio was already marked final")
        self.audio.append(samples)
        self._drop_read_audio()
        if final:
            if self.audio.end == 0:
                raise ValueError("zero-length audio: nothing to render")
            self.audio_final = True
            self.total_frames = math.ceil(self.audio.end * self.fps / self.sample_rate)

    def _drop_read_audio(self) -> None:
        """Forget audio no later block reads (the oldest is a URCR reset re-writing the last frames)."""
        first_latent = max(0, self.latents_done - self.gen.reset_context_frames)
        self.audio.drop_before(self.model.featurizer.first_sample_needed(first_latent, self.stride))

    @property
    def finished(self) -> bool:
        return self.total_frames is not None and self.frames_done >= self.total_frames

    # -- video out -------------------------------------------------------------------------------------------

    def _video_frames_through(self, latent_end: int) -> int:
        """Video frames covered by latent frames [0, latent_end): 1 + stride * (latent_end - 1)."""
        return 1 + self.stride * (latent_end - 1) if latent_end > 0 else 0

    def next_block(self) -> VideoBlock | None:
        if self.finished:
            return None
        n = self.gen.frames_per_block
        first_latent = self.latents_done
        video_end = self._video_frames_through(first_latent + n)
        needed = math.ceil(video_end * self.sample_rate / self.fps)
        if not self.audio_final and self.audio.end < needed:
            return None  # wait for more audio: no look-ahead past this block, but the block needs all of it
        with torch.no_grad():
            frames = self._generate_block(first_latent, n)
        if self.total_frames is not None:
            frames = frames[: max(0, self.total_frames - self.frames_done)]
        self._drop_read_audio()
        block = VideoBlock(index=self.blocks_done, first_frame=self.frames_done, frames=frames)
        self.blocks_done += 1
        self.blocks_rendered_here += 1
        self.frames_done += len(frames)
        return block

    def __iter__(self):
        while (block := self.next_block()) is not None:
            yield block

    # -- the block step --------------------------------------------------------------------------------------

    def _audio_features(self, first_latent: int, n: int) -> torch.Tensor:
        feats = self.model.featurizer.block_features(
            self.audio.samples, first_latent, n, self.stride, offset=self.audio.start
        )
        return feats.unsqueeze(0).to(self.model.device, self.model.dtype)

    def _cond(self, n: int, is_reference: bool) -> torch.Tensor:
        ref = self.reference.expand(-1, -1, n, -1, -1)
        mask = torch.full_like(ref[:, :1], 1.0 if is_reference else 0.0)
        return torch.cat([ref, mask], dim=1)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        # Drawn on the CPU generator so a render is reproducible on any device.
        return torch.randn(like.shape, generator=self.rng, dtype=torch.float32).to(like.device, like.dtype)

    def _forward(
        self, x: torch.Tensor, timestep: float, positions: torch.Tensor, audio: torch.Tensor, write: bool
    ) -> torch.Tensor:
        t = torch.full((1, x.shape[2]), float(timestep), device=x.device)
        return self.model.dit(
            x,
            t,
            self.text,
            positions,
            self._cond(x.shape[2], False),
            audio,
            attention="streaming",
            cache=self.cache,
            write_cache=write,
        )

    def _write_sink(self) -> None:
        dit, ref = self.model.dit, self.reference
        audio = torch.zeros(1, 1, dit.cfg.audio_window, dit.cfg.audio_feature_dim, device=ref.device, dtype=ref.dtype)
        dit(
            ref,
            torch.zeros(1, 1, device=ref.device),
            self.text,
            torch.zeros(1, dtype=torch.long),
            self._cond(1, True),
            audio,
            attention="streaming",
            cache=self.cache,
            write_cache=True,
        )
        self.cache.commit(1)

    def _write_context(self, clean: torch.Tensor, positions: torch.Tensor, audio: torch.Tensor) -> None:
        """MCI: write frames into the cache corrupted at t_mci (t_mci = 0: the clean frames, Self-Forcing)."""
        t_mci = self.gen.t_mci
        x = clean
        if t_mci > 0:
            x = self.schedule.add_noise(clean, self._noise(clean), float(self.schedule.sigma(t_mci)))
        self._forward(x, t_mci, positions, audio, write=True)
        self.cache.commit(clean.shape[2])
        self.journal.append(CacheWrite(x.detach().cpu().float(), t_mci, positions.cpu(), audio.detach().cpu().float()))

    def _reset_cache(self) -> None:
        """URCR: keep the sink, re-write the last frames right after it."""
        m = self.gen.reset_context_frames
        self.cache.reset()
        self.journal.clear()
        context = self.recent[:, :, -m:]
        first = self.latents_done - context.shape[2]
        self._write_context(
            context, self.cache.allocate(context.shape[2]), self._audio_features(first, context.shape[2])
        )

    def next_latents(self, exit_step: int | None = None) -> torch.Tensor:
        """Training rollouts: the next block's latents without decoding (see `denoise_block`). Needs final audio."""
        if not self.audio_final:
            raise RuntimeError("training rollouts need the whole audio (feed_audio(..., final=True))")
        clean = self.denoise_block(self.latents_done, self.gen.frames_per_block, exit_step)
        self.blocks_done += 1
        return clean

    def _generate_block(self, first_latent: int, n: int) -> np.ndarray:
        clean = self.denoise_block(first_latent, n)
        video = self.decoder.decode_block(clean.float())
        return tensor_to_frames(video[0])

    def denoise_block(self, first_latent: int, n: int, exit_step: int | None = None) -> torch.Tensor:
        """The next block's clean latents (1, C, n, h, w): URCR, PSB plan, sampling, then the MCI context write.

        `exit_step` (training, Self-Forcing): stop at that denoising step and return its x0 prediction, computed with
        gradients if they are enabled; every earlier step and the cache write run without gradients.
        """
        if not self.cache.fits(n):
            with torch.no_grad():
                self._reset_cache()
        positions = self.cache.allocate(n)
        audio = self._audio_features(first_latent, n)
        shape = (1, self.preset.dit.latent_channels, n, self.preset.latent_height, self.preset.latent_width)
        x = self._noise(torch.empty(shape, device=self.model.device, dtype=self.model.dtype))
        sigmas = self.schedule.sigmas(self.plan.steps(self.blocks_done))
        for step, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
            exiting = exit_step is not None and step == exit_step
            with torch.set_grad_enabled(exiting and torch.is_grad_enabled()):
                velocity = self._forward(x, float(self.schedule.timestep(sigma)), positions, audio, write=False)
            if exiting:
                x = self.schedule.predict_x0(x, velocity, sigma)
                break
            if self.gen.sampler == "euler":
                x = x + (sigma_next - sigma) * velocity
            else:  # few-step student: predict x0, re-noise to the next level with fresh noise
                x0 = self.schedule.predict_x0(x, velocity, sigma)
                x = self.schedule.add_noise(x0, self._noise(x0), sigma_next) if sigma_next > 0 else x0
        clean = x
        self.latents_done = first_latent + n
        self.recent = torch.cat([self.recent, clean.detach()], dim=2)[:, :, -self._recent_frames() :]
        last = self.total_frames is not None and self._video_frames_through(self.latents_done) >= self.total_frames
        if not last:
            with torch.no_grad():
                self._write_context(clean.detach(), positions, audio)
        return clean

    def _recent_frames(self) -> int:
        return max(self.gen.reset_context_frames, self.decoder_context)

    # -- state -----------------------------------------------------------------------------------------------

    def state(self) -> RenderState:
        """The state at this block boundary."""
        meta = {
            "version": 1,
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
        )

    def _replay(self, state: RenderState) -> None:
        """Rebuild the cache and the decoder exactly as they were when `state` was taken."""
        meta = state.meta
        dev, dt = self.model.device, self.model.dtype
        self.cache.reset()
        self.cache.resets = meta["cache_resets"]
        for w in state.journal:
            self.cache.next_position = int(w.positions[0])
            self.cache.allocate(w.latents.shape[2])
            self._forward(w.latents.to(dev, dt), w.timestep, w.positions, w.audio.to(dev, dt), write=True)
            self.cache.commit(w.latents.shape[2])
        self.cache.next_position = meta["cache_next_position"]
        self.journal = list(state.journal)
        self.blocks_done, self.frames_done, self.latents_done = (
            meta["blocks_done"],
            meta["frames_done"],
            meta["latents_done"],
        )
        self.recent = state.recent.to(dev, dt)
        # The decoder's causal state depends only on the last `decoder_context` latent frames: re-decode them.
        # (If the render is shorter than that, `recent` is its whole history and the warm-up is exact anyway.)
        warmup = self.recent[:, :, -self.decoder_context :]
        if warmup.shape[2]:
            self.decoder.decode_block(warmup.float())
        self.blocks_rendered_here = 0
