"""Speed of the streaming generator on one accelerator: the `wan2.1-1.3b` DiT at 480x832, random weights.

    python benchmarks/gpu_throughput.py --device cuda --out docs/perf/h100.json
    python benchmarks/gpu_throughput.py --device cpu --scale tiny-cpu --accuracy --out docs/perf/cpu-verify.json

Speed does not depend on the weights' values, so the model is built with random weights directly on the device.
B rows render in lockstep (the batch dimension of latents and KV cache) through the block loop of
`model.generator.RenderSession`: PSB step plan, MCI cache write at t_mci, URCR reset when the next block would pass
the trained RoPE horizon. Per block it times, with CUDA events (or the wall clock on a CPU): the URCR reset, audio
features, the denoising passes, the streaming VAE decode (to uint8 frames on the host) and the MCI cache write.

Reported per batch size: per-block DiT latency (denoise passes + cache write, resets amortised), steady-state FPS of
the DiT alone and end to end, first-frame latency (block 0 with PSB's larger step count: audio + denoise + decode),
peak GPU memory, achieved TFLOP/s from the analytic FLOP count (`dit_forward_flops`) and MFU against a bf16 matmul
peak measured in the same run. `--accuracy` compares the `--dtype` streaming output with a float32 reference.
`--scale tiny-cpu` swaps in the `tiny` preset (same classes, same code path) so the whole run takes seconds on a CPU:
its numbers verify the code, they are not results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.audio_features import AudioFeaturizer, Wav2Vec2Featurizer, build_featurizer
from model.config import DiTConfig, Preset, get_preset
from model.dit import CausalWanDiT
from model.scheduler import FlowMatchSchedule, StepPlan
from model.vae import StreamingDecoder, WanVAE, tensor_to_frames

SCALES = ("full", "tiny-cpu")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# Matmul peak probe: square size and iterations per device type (big enough to saturate an H100's tensor cores).
MATMUL_PROBE = {"cuda": (8192, 50), "cpu": (512, 10)}
# The usual back-of-envelope compute floor assumes a 3-frame cache without a sink; printed beside ours.
ISSUE_CACHE_FRAMES = 3
TARGETS = {"e2e_fps_batch1": 25.0, "e2e_fps_per_gpu_batched": 40.0, "first_frame_ms": 500.0}


# -- analytic FLOPs ------------------------------------------------------------------------------------------------


def dit_forward_flops(
    cfg: DiTConfig, *, batch: int, frames: int, tokens_per_frame: int, cache_tokens: int, text_tokens: int
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one streaming forward of `frames` latent frames over `cache_tokens`.

    Counts every linear, conv and attention product of CausalWanDiT.forward; elementwise work (norms, RoPE,
    modulation, softmax) is left out, as is the text embedding (computed once per row).
    """
    d, f, a = cfg.dim, cfg.ffn_dim, cfg.audio_hidden
    patch = math.prod(cfg.patch_size)
    tokens = frames * tokens_per_frame
    keys = cache_tokens + tokens
    per_layer = (
        4 * 2 * tokens * d * d  # self-attention q, k, v, o
        + 2 * 2 * tokens * keys * d  # self-attention scores and weighted values over cache + block
        + 2 * 2 * tokens * d * d  # cross-attention q, o
        + 2 * 2 * text_tokens * d * d  # cross-attention k, v of the text (recomputed every pass)
        + 2 * 2 * tokens * text_tokens * d  # cross-attention scores and values
        + 2 * 2 * tokens * d * f  # feed-forward
    )
    if cfg.audio_injection == "add":
        per_layer += 2 * frames * a * d  # per-frame audio projection
        audio_encoder = 2 * frames * (cfg.audio_window * cfg.audio_feature_dim * a + a * a)
    else:
        window = cfg.audio_window
        per_layer += 2 * 2 * tokens * d * d + 2 * frames * window * a * 2 * d + 2 * 2 * tokens * window * d
        audio_encoder = 2 * frames * window * (cfg.audio_feature_dim * a + a * a)
    embed = (
        2 * tokens * (cfg.latent_channels + cfg.cond_channels) * patch * d  # patch + conditioning embeddings
        + 2 * frames * (cfg.freq_dim * d + d * d + 6 * d * d)  # time embedding and projection
        + 2 * tokens * d * cfg.latent_channels * patch  # head
        + audio_encoder
    )
    return batch * (cfg.num_layers * per_layer + embed)


def block_flops(preset: Preset, *, batch: int, steps: int, cache_frames: int, with_sink: bool, text_tokens: int) -> int:
    """FLOPs of one block: `steps` denoise passes + the MCI cache write, at a fixed cache fill."""
    s = preset.tokens_per_frame
    cache_tokens = (cache_frames + (preset.generator.sink_frames if with_sink else 0)) * s
    one = dit_forward_flops(
        preset.dit,
        batch=batch,
        frames=preset.generator.frames_per_block,
        tokens_per_frame=s,
        cache_tokens=cache_tokens,
        text_tokens=text_tokens,
    )
    return (steps + 1) * one


# -- timing --------------------------------------------------------------------------------------------------------


class Clock:
    """Marks on the device timeline: CUDA events on a GPU, the wall clock elsewhere (where work is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a loop of square matmuls in `dtype`: the MFU denominator, measured on this very device."""
    n, iters = MATMUL_PROBE["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    sync(device)
    clock = Clock(device)
    start = clock.mark()
    for _ in range(iters):
        torch.matmul(a, b)
    elapsed = clock.ms(start, clock.mark())
    return 2 * n**3 * iters / (elapsed / 1e3) / 1e12


# -- the model ------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What one benchmark run holds resident: the network, the VAE, the audio featurizer and its settings."""

    preset: Preset
    dit: CausalWanDiT
    vae: WanVAE
    featurizer: AudioFeaturizer
    device: torch.device
    dtype: torch.dtype
    text_tokens: int


def scaled_preset(name: str, scale: str, height: int | None, width: int | None, steps: int | None) -> Preset:
    preset = get_preset("tiny" if scale == "tiny-cpu" else name)
    if height or width:
        preset = preset.with_resolution(height or preset.video.height, width or preset.video.width)
    if steps:
        plan = preset.generator.step_plan[:-1] + (steps,)
        preset = preset.model_copy(update={"generator": preset.generator.model_copy(update={"step_plan": plan})})
    return preset


def cast_dit(dit: CausalWanDiT, dtype: torch.dtype) -> CausalWanDiT:
    """`dit` in `dtype` for inference (its norms compute in float32 whatever the weights' dtype)."""
    return dit.to(dtype).eval().requires_grad_(False)


def build_dit(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int) -> CausalWanDiT:
    """Random weights made on the device; conditioning randomised as AvatarModel.random does, so it does real work."""
    torch.manual_seed(seed)
    with torch.device(device):
        dit = CausalWanDiT(preset.dit)
        with torch.no_grad():
            for name, p in dit.named_parameters():
                if dit.is_conditioning_param(name):
                    p.normal_(0.0, 0.02)
    return cast_dit(dit, dtype)


def build_featurizer_on(preset: Preset, device: torch.device, dtype: torch.dtype) -> AudioFeaturizer:
    """The preset's featurizer; wav2vec2 gets random weights of the right width (saved and loaded the real way)."""
    if preset.audio.encoder != "wav2vec2":
        return build_featurizer(preset)
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    with tempfile.TemporaryDirectory() as folder:
        Wav2Vec2Model(Wav2Vec2Config(hidden_size=preset.dit.audio_feature_dim)).save_pretrained(folder)
        return Wav2Vec2Featurizer(folder, preset.audio, preset.video.fps, device=device, dtype=dtype)


def build_bench(
    preset: Preset, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype, seed: int = 0
) -> Bench:
    dit = build_dit(preset, device, dtype, seed)
    with torch.device(device):
        vae = WanVAE(preset.vae)
    vae = vae.to(vae_dtype).eval().requires_grad_(False)
    featurizer = build_featurizer_on(preset, device, dtype)
    return Bench(preset, dit, vae, featurizer, device, dtype, text_tokens=preset.text.max_length)


# -- B rows in lockstep ----------------------------------------------------------------------------------------------


@dataclass
class BlockTiming:
    index: int
    steps: int
    video_frames: int  # per row
    reset_ms: float
    audio_ms: float
    denoise_ms: float
    decode_ms: float
    write_ms: float
    dit_flops: int  # denoise passes + cache write (+ the reset's write), at the cache fill actually seen

    @property
    def dit_ms(self) -> float:
        return self.reset_ms + self.denoise_ms + self.write_ms

    @property
    def total_ms(self) -> float:
        return self.dit_ms + self.audio_ms + self.decode_ms


class LockstepStream:
    """`batch` rows generated together: RenderSession's block loop with a batch dimension.

    Noise comes from a CPU generator, as in the renderer, so two streams with the same seed see the same inputs
    whatever their device or dtype (the accuracy mode relies on it).
    """

    def __init__(self, bench: Bench, batch: int, num_blocks: int, seed: int = 0):
        self.bench, self.batch = bench, batch
        preset, dev, dt = bench.preset, bench.device, bench.dtype
        self.gen = preset.generator
        self.plan = StepPlan(self.gen.step_plan)
        self.schedule = FlowMatchSchedule(self.gen.shift, self.gen.num_train_timesteps)
        self.stride = preset.vae.temporal_stride
        self.rng = torch.Generator().manual_seed(seed)
        self.clock = Clock(dev)
        cfg = preset.dit
        self.latent_shape = (
            batch,
            cfg.latent_channels,
            self.gen.frames_per_block,
            preset.latent_height,
            preset.latent_width,
        )
        # Per-row speech (random samples: speed does not depend on them) long enough for every block.
        video_frames = 1 + self.stride * (num_blocks * self.gen.frames_per_block - 1)
        num_samples = math.ceil(video_frames * preset.audio.sample_rate / preset.video.fps)
        self.samples = [0.1 * torch.randn(num_samples, generator=self.rng).numpy() for _ in range(batch)]
        self.reference = self._noise((batch, cfg.latent_channels, 1, preset.latent_height, preset.latent_width))
        text = torch.randn(batch, bench.text_tokens, cfg.text_dim, generator=self.rng).to(dev, dt)
        with torch.no_grad():
            self.text = bench.dit.embed_text(text)  # once per row, as RenderSession does
        self.cache = bench.dit.new_cache(
            batch=batch,
            tokens_per_frame=preset.tokens_per_frame,
            sink_frames=self.gen.sink_frames,
            window_frames=self.gen.window_frames,
            horizon_frames=self.gen.horizon_frames,
        )
        self.decoder = StreamingDecoder(bench.vae)
        self.latents_done = 0
        self.blocks_done = 0
        self.recent = self.reference[:, :, :0]
        self.flops = 0
        with torch.no_grad():
            self._write_sink()

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.bench.device, self.bench.dtype)

    def _cond(self, n: int, is_reference: bool) -> torch.Tensor:
        ref = self.reference.expand(-1, -1, n, -1, -1)
        return torch.cat([ref, torch.full_like(ref[:, :1], 1.0 if is_reference else 0.0)], dim=1)

    def _audio(self, first_latent: int, n: int) -> torch.Tensor:
        preset = self.bench.preset
        video_end = 1 + self.stride * (first_latent + n - 1)
        end = math.ceil(video_end * preset.audio.sample_rate / preset.video.fps)
        rows = [self.bench.featurizer.block_features(s[:end], first_latent, n, self.stride) for s in self.samples]
        return torch.stack(rows).to(self.bench.device, self.bench.dtype)

    def _forward(
        self,
        x: torch.Tensor,
        timestep: float,
        positions: torch.Tensor,
        audio: torch.Tensor,
        write: bool,
        is_reference: bool = False,
    ) -> torch.Tensor:
        n = x.shape[2]
        self.flops += dit_forward_flops(
            self.bench.dit.cfg,
            batch=self.batch,
            frames=n,
            tokens_per_frame=self.cache.tokens_per_frame,
            cache_tokens=self.cache.valid_tokens(),
            text_tokens=self.bench.text_tokens,
        )
        t = torch.full((self.batch, n), float(timestep), device=x.device)
        return self.bench.dit(
            x,
            t,
            self.text,
            positions,
            self._cond(n, is_reference),
            audio,
            attention="streaming",
            cache=self.cache,
            write_cache=write,
        )

    def _write_sink(self) -> None:
        cfg = self.bench.dit.cfg
        audio = torch.zeros(
            self.batch, 1, cfg.audio_window, cfg.audio_feature_dim, device=self.bench.device, dtype=self.bench.dtype
        )
        self._forward(self.reference, 0.0, torch.zeros(1, dtype=torch.long), audio, write=True, is_reference=True)
        self.cache.commit(1)

    def _write_context(self, clean: torch.Tensor, positions: torch.Tensor, audio: torch.Tensor) -> None:
        """MCI: the frames go into the cache corrupted at t_mci."""
        x = clean
        if self.gen.t_mci > 0:
            sigma = float(self.schedule.sigma(self.gen.t_mci))
            x = self.schedule.add_noise(clean, self._noise(clean.shape), sigma)
        self._forward(x, self.gen.t_mci, positions, audio, write=True)
        self.cache.commit(clean.shape[2])

    @torch.no_grad()
    def step(self) -> tuple[BlockTiming, torch.Tensor]:
        """One block for every row; returns its timing and the clean latents."""
        n, clock = self.gen.frames_per_block, self.clock
        self.flops = 0
        t_start = clock.mark()
        if not self.cache.fits(n):  # URCR: keep the sink, re-write the last frames right after it
            m = self.gen.reset_context_frames
            self.cache.reset()
            self._write_context(self.recent[:, :, -m:], self.cache.allocate(m), self._audio(self.latents_done - m, m))
        t_reset = clock.mark()
        positions = self.cache.allocate(n)
        audio = self._audio(self.latents_done, n)
        t_audio = clock.mark()
        steps = self.plan.steps(self.blocks_done)
        x = self._noise(self.latent_shape)
        sigmas = self.schedule.sigmas(steps).tolist()
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = self._forward(x, float(self.schedule.timestep(sigma)), positions, audio, write=False)
            x = x + (sigma_next - sigma) * velocity
        t_denoise = clock.mark()
        # Frames reach the host before the cache write: the write is not on the path to the viewer.
        video = self.decoder.decode_block(x.float())
        frames = [tensor_to_frames(video[b]) for b in range(self.batch)]
        t_decode = clock.mark()
        self._write_context(x, positions, audio)
        t_write = clock.mark()
        self.recent = torch.cat([self.recent, x], dim=2)[:, :, -self.gen.reset_context_frames :]
        self.latents_done += n
        self.blocks_done += 1
        timing = BlockTiming(
            index=self.blocks_done - 1,
            steps=steps,
            video_frames=frames[0].shape[0],
            reset_ms=clock.ms(t_start, t_reset),
            audio_ms=clock.ms(t_reset, t_audio),
            denoise_ms=clock.ms(t_audio, t_denoise),
            decode_ms=clock.ms(t_denoise, t_decode),
            write_ms=clock.ms(t_decode, t_write),
            dit_flops=self.flops,
        )
        return timing, x


def default_num_blocks(preset: Preset) -> int:
    """Enough blocks to pass the PSB head and include one URCR reset, plus one block after it."""
    gen = preset.generator
    before_reset = (gen.horizon_frames - gen.sink_frames) // gen.frames_per_block
    return max(before_reset, len(gen.step_plan)) + 2


def run_batch(bench: Bench, batch: int, num_blocks: int, peak_tflops: float, warmup_blocks: int | None = None) -> dict:
    """Warm-up stream (by default as long, so every cache shape is seen), then a measured stream of `num_blocks`."""
    warmup = LockstepStream(bench, batch, num_blocks, seed=1)
    for _ in range(num_blocks if warmup_blocks is None else warmup_blocks):
        warmup.step()
    del warmup
    sync(bench.device)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    stream = LockstepStream(bench, batch, num_blocks, seed=2)
    timings = [stream.step()[0] for _ in range(num_blocks)]
    sync(bench.device)
    peak_gib = torch.cuda.max_memory_allocated(bench.device) / 2**30 if bench.device.type == "cuda" else None

    steady = [t for t in timings if t.index >= len(bench.preset.generator.step_plan) - 1 and t.index > 0]
    frames = sum(t.video_frames for t in steady)
    dit_s = sum(t.dit_ms for t in steady) / 1e3
    total_s = sum(t.total_ms for t in steady) / 1e3
    achieved = sum(t.dit_flops for t in steady) / dit_s / 1e12
    first = timings[0]
    return {
        "batch": batch,
        "blocks": num_blocks,
        "steady_blocks": [t.index for t in steady],
        "block_latency_ms": sum(t.dit_ms for t in steady) / len(steady),  # denoise + write (+ amortised resets)
        "block_e2e_ms": sum(t.total_ms for t in steady) / len(steady),
        "dit_fps": batch * frames / dit_s,
        "e2e_fps": batch * frames / total_s,
        "e2e_fps_per_row": frames / total_s,
        "first_frame_ms": first.audio_ms + first.denoise_ms + first.decode_ms,
        "first_block_steps": first.steps,
        "peak_memory_gib": peak_gib,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops,
        "per_block": [dict(asdict(t), dit_ms=t.dit_ms, total_ms=t.total_ms) for t in timings],
    }


# -- accuracy ---------------------------------------------------------------------------------------------------------


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def run_accuracy(bench: Bench, dtype: torch.dtype, num_blocks: int) -> dict:
    """The same stream (same weights, noise, audio) in `dtype` and in float32: relative error of each block's latents.

    The low-precision network is a cast copy of the float32 one; audio features and the VAE are shared.
    """
    reference = dataclasses.replace(bench, dit=cast_dit(copy.deepcopy(bench.dit), torch.float32), dtype=torch.float32)
    low = dataclasses.replace(bench, dit=cast_dit(copy.deepcopy(reference.dit), dtype), dtype=dtype)
    ours, ref = LockstepStream(low, 1, num_blocks, seed=3), LockstepStream(reference, 1, num_blocks, seed=3)
    errors = [relative_error(ours.step()[1], ref.step()[1]) for _ in range(num_blocks)]
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "reference_dtype": "float32",
        "blocks": num_blocks,
        "steps_per_block": [StepPlan(bench.preset.generator.step_plan).steps(i) for i in range(num_blocks)],
        "latent_relative_error_per_block": errors,
    }


# -- the run ----------------------------------------------------------------------------------------------------------


def sdpa_context(backend: str):
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(names[backend])


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")  # bf16 matmuls crawl on a CPU
    dtype = DTYPES[args.dtype]
    preset = scaled_preset(args.preset, args.scale, args.height, args.width, args.steps)
    bench = build_bench(preset, device, dtype, DTYPES[args.vae_dtype])
    if args.compile:  # one compiled graph per block (the cache bookkeeping between them stays eager)
        for block in bench.dit.blocks:
            block.compile(dynamic=False)
    num_blocks = args.blocks or default_num_blocks(preset)
    gen = preset.generator
    steady_steps = gen.step_plan[-1]
    text_tokens = bench.text_tokens
    # Steady state of the cache: sink + full window. Video frames per steady block: stride * frames_per_block.
    frames_per_block = preset.vae.temporal_stride * gen.frames_per_block
    steady_block = block_flops(
        preset, batch=1, steps=steady_steps, cache_frames=gen.window_frames, with_sink=True, text_tokens=text_tokens
    )
    issue_block = block_flops(
        preset, batch=1, steps=steady_steps, cache_frames=ISSUE_CACHE_FRAMES, with_sink=False, text_tokens=text_tokens
    )
    with sdpa_context(args.sdpa):
        peak = measure_matmul_peak(device, dtype)
        batches = [run_batch(bench, b, num_blocks, peak, args.warmup_blocks) for b in args.batch]
        accuracy = None
        if args.accuracy:  # a float32 run is compared as bfloat16 (there is nothing to compare it with otherwise)
            low = dtype if dtype != torch.float32 else torch.bfloat16
            accuracy = run_accuracy(bench, low, args.accuracy_blocks)

    is_result = device.type == "cuda" and args.scale == "full"
    result = {
        "label": (
            "GPU measurement"
            if is_result
            else "CPU VERIFICATION of the benchmark's code path with a scaled-down config: NOT a performance result"
        ),
        "command": "python benchmarks/gpu_throughput.py " + " ".join(args.argv),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "preset": preset.name,
        "scale": args.scale,
        "resolution": [preset.video.height, preset.video.width],
        "dtype": args.dtype,
        "vae_dtype": args.vae_dtype,
        "options": {"compile": args.compile, "sdpa": args.sdpa},
        "config": {
            "step_plan": list(gen.step_plan),
            "frames_per_block": gen.frames_per_block,
            "video_frames_per_steady_block": frames_per_block,
            "tokens_per_frame": preset.tokens_per_frame,
            "text_tokens": text_tokens,
            "sink_frames": gen.sink_frames,
            "window_frames": gen.window_frames,
            "horizon_frames": gen.horizon_frames,
            "t_mci": gen.t_mci,
            "layers": preset.dit.num_layers,
            "dim": preset.dit.dim,
            "dit_parameters": sum(p.numel() for p in bench.dit.parameters()),
        },
        "matmul_peak_tflops": peak,
        "analytic_flops": {
            "steady_block": steady_block,
            "steady_per_video_frame": steady_block / frames_per_block,
            "issue_example_per_video_frame": issue_block / frames_per_block,
            "note": f"{steady_steps} denoise passes + 1 cache write over a {gen.frames_per_block}-latent-frame block; "
            f"steady: sink + {gen.window_frames}-frame window; issue example: {ISSUE_CACHE_FRAMES}-frame "
            "cache, no sink",
        },
        "batches": batches,
        "accuracy": accuracy,
    }
    if is_result:
        b1 = next((b for b in batches if b["batch"] == 1), None)
        best = max(batches, key=lambda b: b["e2e_fps"])
        result["targets"] = {
            "e2e_fps_batch1": {"target": TARGETS["e2e_fps_batch1"], "measured": b1 and b1["e2e_fps"]},
            "e2e_fps_per_gpu_batched": {
                "target": TARGETS["e2e_fps_per_gpu_batched"],
                "measured": best["e2e_fps"],
                "batch": best["batch"],
            },
            "first_frame_ms": {"target": TARGETS["first_frame_ms"], "measured": b1 and b1["first_frame_ms"]},
        }
    return result


def print_table(result: dict) -> None:
    print(result["label"])
    print(
        f"{result['preset']} {result['resolution'][0]}x{result['resolution'][1]} {result['dtype']} on "
        f"{result['device']}; step plan {result['config']['step_plan']}; matmul peak "
        f"{result['matmul_peak_tflops']:.2f} TFLOP/s"
    )
    flops = result["analytic_flops"]
    print(
        f"analytic: {flops['steady_block'] / 1e12:.3f} TFLOP per steady block, "
        f"{flops['steady_per_video_frame'] / 1e12:.3f} TFLOP per video frame "
        f"(3-frame cache, no sink: {flops['issue_example_per_video_frame'] / 1e12:.3f})"
    )
    header = [
        "batch",
        "block ms",
        "e2e block ms",
        "DiT fps",
        "e2e fps",
        "fps/row",
        "first frame ms",
        "peak GiB",
        "TFLOP/s",
        "MFU",
    ]
    print(" | ".join(f"{h:>14}" for h in header))
    for b in result["batches"]:
        mem = "-" if b["peak_memory_gib"] is None else f"{b['peak_memory_gib']:.2f}"
        row = [
            b["batch"],
            f"{b['block_latency_ms']:.1f}",
            f"{b['block_e2e_ms']:.1f}",
            f"{b['dit_fps']:.2f}",
            f"{b['e2e_fps']:.2f}",
            f"{b['e2e_fps_per_row']:.2f}",
            f"{b['first_frame_ms']:.1f}",
            mem,
            f"{b['achieved_tflops']:.3f}",
            f"{b['mfu']:.1%}",
        ]
        print(" | ".join(f"{v:>14}" for v in row))
    if result["accuracy"]:
        acc = result["accuracy"]
        errors = ", ".join(f"{e:.2e}" for e in acc["latent_relative_error_per_block"])
        print(f"accuracy {acc['dtype']} vs {acc['reference_dtype']}: latent relative error per block {errors}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--height", type=int, default=None, help="default: the preset's (480 for wan2.1-1.3b)")
    p.add_argument("--width", type=int, default=None, help="default: the preset's (832 for wan2.1-1.3b)")
    p.add_argument("--steps", type=int, default=None, help="steady-state steps (the step plan's last entry)")
    p.add_argument(
        "--batch",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 4],
        help="comma-separated batch sizes (rows in lockstep)",
    )
    p.add_argument("--blocks", type=int, default=None, help="measured blocks (default: through one URCR reset)")
    p.add_argument("--warmup-blocks", type=int, default=None, help="default: as many as measured")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument(
        "--vae-dtype", choices=sorted(DTYPES), default="float32", help="the renderer keeps the VAE in float32"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="full",
        help="tiny-cpu: the tiny preset, to verify the code path on a CPU (not a result)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--sdpa", choices=SDPA_BACKENDS, default="auto", help="force one SDPA backend")
    p.add_argument("--accuracy", action="store_true", help="also compare --dtype with a float32 reference")
    p.add_argument("--accuracy-blocks", type=int, default=2, help="blocks of the accuracy comparison")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
