"""Speed of the product's generation engine on one accelerator, with random weights of the exact shape.

    python benchmarks/gpu_throughput.py --preset livetalk-1.3b --device cuda --batch 1,2,4 \
        --out docs/perf/h200-livetalk.json
    python benchmarks/gpu_throughput.py --preset livetalk-1.3b --device cpu --scale small --out /tmp/verify.json

Speed does not depend on the weights' values, so the model is built with random weights directly on the device (the
audio encoder too: a random wav2vec2 of the preset's width). B rows render through `model.engine.Engine`, the engine
the render actors run: each row its own KV cache, positions, noise and PSB phase, every pass stacked across the
rows, then the streaming VAE decode of every finished block. Nothing here has a block loop of its own.

Reported per batch size: DiT and decode time per block, steady-state video frames per second (all rows, and per
row), time to the first frame (the portrait's encode, the audio features, block 0 and its decode), peak GPU memory,
achieved TFLOP/s from the analytic FLOP count of every pass the engine ran (`dit_forward_flops`, at the cache fill
each pass saw) and MFU against a matmul peak measured in the same run. `--accuracy` compares a bfloat16 render with
the float32 one. `--scale small` swaps in a small config of the same preset family (same classes, same code path)
so the run takes seconds on a CPU: its numbers verify the code, they are not results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import DiTConfig, Preset, RenderSettings, TextConfig, get_preset
from model.dit import CausalWanDiT
from model.engine import Engine
from model.generator import AvatarModel
from model.text_encoder import NullTextEncoder
from model.vae import WanVAE

SCALES = ("full", "small")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# Matmul peak probe: square size and iterations per device type (big enough to saturate a datacenter GPU).
MATMUL_PROBE = {"cuda": (8192, 50), "cpu": (512, 10)}
SMALL_SIZE = 64  # video height and width of --scale small
SPEECH_SEED = 0


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
    audio_layers = len(cfg.audio_layer_range)
    if cfg.audio_injection == "add":
        audio_per_layer = 2 * frames * a * d  # per-frame audio projection
        second = 0 if cfg.audio_encoder == "pack" else a * a  # AudioPack: one Linear; the MLP has two
        audio_encoder = 2 * frames * (cfg.audio_window * cfg.audio_feature_dim * a + second)
    else:
        window = cfg.audio_window
        audio_per_layer = 2 * 2 * tokens * d * d + 2 * frames * window * a * 2 * d + 2 * 2 * tokens * window * d
        audio_encoder = 2 * frames * window * (cfg.audio_feature_dim * a + a * a)
    embed = (
        2 * tokens * (cfg.latent_channels + cfg.cond_channels) * patch * d  # patch + conditioning embeddings
        + 2 * frames * (cfg.freq_dim * d + d * d + 6 * d * d)  # time embedding and projection
        + 2 * tokens * d * cfg.latent_channels * patch  # head
        + audio_encoder
    )
    return batch * (cfg.num_layers * per_layer + audio_layers * audio_per_layer + embed)


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


def scaled_preset(name: str, scale: str, height: int | None, width: int | None, steps: int | None) -> Preset:
    """The preset, or with `small` a config of the same family small enough for a CPU (tiny for tiny-like presets,
    a small LiveTalk-shaped network for livetalk)."""
    preset = get_preset(name)
    if scale == "small":
        if preset.generator.sink == "first_frames":
            from model.livetalk import preset_from_livetalk

            kwargs = {
                "dim": 64,
                "in_dim": 33,
                "ffn_dim": 128,
                "out_dim": 16,
                "text_dim": 32,
                "freq_dim": 32,
                "eps": 1e-6,
                "patch_size": (1, 2, 2),
                "num_heads": 2,
                "num_layers": 4,
                "audio_hidden_size": 16,
                "audio_feature_dim": 128,
                "local_attn_size": 15,
                "sink_size": 9,
            }
            vae = preset.vae.model_copy(update={"base_dim": 8, "num_res_blocks": 1})
            text = TextConfig(encoder="umt5", max_length=16)
            preset = preset_from_livetalk(
                kwargs,
                frames_per_block=3,
                height=SMALL_SIZE,
                width=SMALL_SIZE,
                vae=vae,
                text=text,
                name=f"{name}-small",
            )
        else:
            preset = get_preset("tiny")
    if height or width:
        preset = preset.with_resolution(height or preset.video.height, width or preset.video.width)
    if steps:
        plan = preset.generator.step_plan[:-1] + (steps,)
        preset = preset.with_generator(step_plan=plan)
    return preset


def random_wav2vec2(preset: Preset, folder: str) -> None:
    """A random wav2vec2 whose features have the preset's width, saved the real way (transformers' format)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    width = preset.dit.audio_feature_dim
    if preset.audio.encoder == "omniavatar":  # the last hidden state and every hidden state: width = h * (L + 2)
        hidden, layers = (768, 12) if width == 768 * 14 else (width // 4, 2)
        config = Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=layers)
    else:
        config = Wav2Vec2Config(hidden_size=width)
    if config.hidden_size < 768:  # small: a small encoder too
        config = Wav2Vec2Config(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16,) * 7,
        )
    Wav2Vec2Model(config).save_pretrained(folder)


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> AvatarModel:
    """An AvatarModel of the preset with random weights made on the device (conditioning randomised as
    `AvatarModel.random` does, so it does real work). Prompts embed to zeros of the real length: the text encoder
    runs once per row, outside the block loop this measures."""
    torch.manual_seed(seed)
    with torch.device(device):
        dit = CausalWanDiT(preset.dit)
        vae = WanVAE(preset.vae)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if dit.is_conditioning_param(name):
                p.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as folder:
        audio_dir = None
        if preset.audio.encoder != "logmel":
            random_wav2vec2(preset, folder)
            audio_dir = folder
        model = AvatarModel(
            preset, dit, vae, description=f"random {preset.name}", audio_model_dir=audio_dir, device=device, dtype=dtype
        )
    model.text_encoder = NullTextEncoder(preset.dit.text_dim, preset.text.max_length, device, dtype)
    return model


@dataclass
class PassCounter:
    """Counts every streaming pass the DiT runs (a forward pre-hook): passes, and their analytic FLOPs at the
    cache fill each one saw."""

    text_tokens: int
    passes: int = 0
    flops: int = 0
    writes: list = field(default_factory=list)

    def __call__(self, module, args, kwargs):
        latents = args[0]
        caches = kwargs.get("cache") or []
        for cache in caches:
            self.flops += dit_forward_flops(
                module.cfg,
                batch=1,
                frames=latents.shape[2],
                tokens_per_frame=cache.tokens_per_frame,
                cache_tokens=cache.valid_tokens(),
                text_tokens=self.text_tokens,
            )
        self.passes += 1


# -- B rows through the engine ---------------------------------------------------------------------------------------


def speech(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voiced = np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    return (0.3 * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def blocks_seconds(preset: Preset, blocks: int) -> float:
    """Audio long enough for `blocks` blocks."""
    latents = blocks * preset.generator.frames_per_block
    return (1 + preset.vae.temporal_stride * (latents - 1)) / preset.video.fps


def steady_from(preset: Preset) -> int:
    """The first block with a full cache and the plan's steady step count: from here every block costs the same."""
    gen = preset.generator
    n = gen.frames_per_block
    fill = -(-gen.window_frames // n) + (-(-gen.sink_frames // n) if gen.sink == "first_frames" else 0)
    return max(len(gen.step_plan) - 1, fill, 1)


def default_num_blocks(preset: Preset) -> int:
    """Three steady blocks, and where the horizon is short enough, one URCR reset among them."""
    gen = preset.generator
    blocks = steady_from(preset) + 3
    if gen.horizon_frames < 64:
        blocks = max(blocks, (gen.horizon_frames - gen.sink_frames) // gen.frames_per_block + 2)
    return blocks


def render_rows(model: AvatarModel, batch: int, num_blocks: int, seed: int, counter: PassCounter | None = None):
    """`batch` rows of `num_blocks` blocks through one Engine: per engine step, its time and what it finished."""
    preset, device = model.preset, model.device
    clock = Clock(device)
    sync(device)
    start = clock.mark()
    sessions = []
    for row in range(batch):
        rng = np.random.default_rng(seed * 1000 + row)
        portrait = (rng.random((preset.video.height, preset.video.width, 3)) * 255).astype(np.uint8)
        session = model.open(portrait, None, RenderSettings(seed=seed * 1000 + row))
        session.feed_audio(speech(blocks_seconds(preset, num_blocks), preset.audio.sample_rate, seed + row), final=True)
        sessions.append(session)
    opened = clock.mark()
    engine = Engine(model)
    for session in sessions:
        engine.add(session)
    steps = []
    hook = model.dit.register_forward_pre_hook(counter, with_kwargs=True) if counter else None
    try:
        with torch.no_grad():
            while engine.active:
                flops_before = counter.flops if counter else 0
                mark = clock.mark()
                finished = engine.step()
                generated = clock.mark()
                decoded = []  # decoded in the engine's thread, after the step: the DiT and the VAE are timed apart
                for session, latents in finished:
                    block = session.emit(latents)
                    decoded.append((block.index, len(block.frames)))
                end = clock.mark()
                flops = (counter.flops if counter else 0) - flops_before
                steps.append(
                    {
                        "ms": clock.ms(mark, end),
                        "dit_ms": clock.ms(mark, generated),
                        "flops": flops,
                        "decode_ms": clock.ms(generated, end),
                        "blocks": decoded,
                    }
                )
    finally:
        if hook:
            hook.remove()
    if engine.failures:
        raise RuntimeError(f"rows failed in the engine: {engine.failures}")
    return {"open_ms": clock.ms(start, opened), "steps": steps, "sessions": sessions}


def run_batch(model: AvatarModel, batch: int, num_blocks: int, peak_tflops: float, warmup: bool = True) -> dict:
    """A warm-up render of the same shape (every cache fill seen once), then the measured one."""
    if warmup:
        render_rows(model, batch, num_blocks, seed=1)
    device = model.device
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = PassCounter(model.preset.text.max_length)
    run = render_rows(model, batch, num_blocks, seed=2, counter=counter)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    steps = run["steps"]

    # Per block index: the engine steps that ran it (all rows advance in lockstep here, one block at a time).
    per_block, current, first_frame_ms = [], {"ms": 0.0, "dit_ms": 0.0, "flops": 0, "passes": 0}, None
    for step in steps:
        for key in ("ms", "dit_ms", "flops"):
            current[key] += step[key]
        current["passes"] += 1
        if step["blocks"]:
            frames = sum(n for _, n in step["blocks"])
            rows = len(step["blocks"])
            per_block.append(
                {
                    "index": step["blocks"][0][0],
                    "rows": rows,
                    "passes": current["passes"],
                    "video_frames": frames // rows,
                    "step_ms": current["ms"],
                    "dit_ms": current["dit_ms"],
                    "decode_ms": step["decode_ms"],
                    "dit_flops": current["flops"],
                }
            )
            if first_frame_ms is None:
                first_frame_ms = run["open_ms"] + current["ms"]
            current = {"ms": 0.0, "dit_ms": 0.0, "flops": 0, "passes": 0}
    gen = model.preset.generator
    steady = [b for b in per_block if b["index"] >= steady_from(model.preset)] or per_block[1:] or per_block
    frames = sum(b["video_frames"] * b["rows"] for b in steady)
    dit_s = sum(b["dit_ms"] for b in steady) / 1e3
    total_s = sum(b["step_ms"] for b in steady) / 1e3
    achieved = sum(b["dit_flops"] for b in steady) / dit_s / 1e12
    return {
        "batch": batch,
        "blocks": num_blocks,
        "steady_blocks": [b["index"] for b in steady],
        "dit_ms_per_block": sum(b["dit_ms"] for b in steady) / len(steady),
        "decode_ms_per_block": sum(b["decode_ms"] for b in steady) / len(steady),
        "dit_fps": frames / dit_s,
        "e2e_fps": frames / total_s,
        "e2e_fps_per_row": frames / total_s / batch,
        "first_frame_ms": first_frame_ms,
        "open_ms": run["open_ms"],
        "first_block_steps": gen.step_plan[0],
        "peak_memory_gib": peak_gib,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops,
        "passes": counter.passes,
        "per_block": per_block,
    }


# -- accuracy ---------------------------------------------------------------------------------------------------------


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference.double()).norm() / reference.double().norm())


def block_latents(model: AvatarModel, num_blocks: int, seed: int) -> list[torch.Tensor]:
    preset = model.preset
    rng = np.random.default_rng(seed)
    portrait = (rng.random((preset.video.height, preset.video.width, 3)) * 255).astype(np.uint8)
    session = model.open(portrait, None, RenderSettings(seed=seed))
    session.feed_audio(speech(blocks_seconds(preset, num_blocks), preset.audio.sample_rate, seed), final=True)
    with torch.no_grad():
        return [session.next_latents().float().cpu() for _ in range(num_blocks)]


def run_accuracy(model: AvatarModel, dtype: torch.dtype, num_blocks: int) -> dict:
    """The same render (weights, noise, audio) in `dtype` and in float32: relative error of each block's latents.
    The low-precision network is a cast of the float32 one; the VAE and the audio encoder are shared."""
    reference_dit = model.dit
    low_dit = __import__("copy").deepcopy(reference_dit).to(dtype)
    reference = block_latents(model, num_blocks, seed=3)
    model.dit, model.dtype = low_dit, dtype
    try:
        low = block_latents(model, num_blocks, seed=3)
    finally:
        model.dit, model.dtype = reference_dit, torch.float32
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "reference_dtype": "float32",
        "blocks": num_blocks,
        "latent_relative_error_per_block": [relative_error(a, b) for a, b in zip(low, reference)],
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


def analytic_flops(preset: Preset) -> dict:
    """FLOPs of one row's steady block (full cache): the compute floor of a video frame on any device."""
    gen = preset.generator
    steady_frames = preset.vae.temporal_stride * gen.frames_per_block
    shape = {
        "frames": gen.frames_per_block,
        "tokens_per_frame": preset.tokens_per_frame,
        "cache_tokens": (gen.sink_frames + gen.window_frames) * preset.tokens_per_frame,
    }
    forward = dit_forward_flops(preset.dit, batch=1, text_tokens=preset.text.max_length, **shape)
    without_text_kv = dit_forward_flops(preset.dit, batch=1, text_tokens=0, **shape)
    text_kv = preset.dit.num_layers * 2 * 2 * preset.text.max_length * preset.dit.dim**2
    block = (gen.step_plan[-1] + 1) * forward
    return {
        "steady_forward": forward,
        "steady_block": block,
        "steady_per_video_frame": block / steady_frames,
        "text_kv_share": text_kv / forward,
        "text_attention_share": (forward - without_text_kv) / forward,
        "note": f"{gen.step_plan[-1]} denoising passes + 1 cache write over a {gen.frames_per_block}-frame block "
        f"with a full cache ({gen.sink_frames} sink + {gen.window_frames} window frames), one row",
    }


def print_flops(preset: Preset) -> None:
    flops = analytic_flops(preset)
    print(
        f"{preset.name} {preset.video.height}x{preset.video.width}: {flops['steady_forward'] / 1e12:.2f} TFLOP per "
        f"steady forward, {flops['steady_block'] / 1e12:.2f} TFLOP per steady block, "
        f"{flops['steady_per_video_frame'] / 1e12:.2f} TFLOP per video frame; the text's K/V (recomputed every "
        f"pass) {flops['text_kv_share']:.1%} of a forward, all text cross-attention {flops['text_attention_share']:.1%}"
        f" ({flops['note']})"
    )


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")  # bf16 matmuls crawl on a CPU
    dtype = DTYPES[args.dtype]
    preset = scaled_preset(args.preset, args.scale, args.height, args.width, args.steps)
    model = build_model(preset, device, torch.float32 if args.accuracy else dtype)
    num_blocks = args.blocks or default_num_blocks(preset)
    gen = preset.generator
    with sdpa_context(args.sdpa):
        accuracy = None
        if args.accuracy:  # a float32 run is compared as bfloat16 (there is nothing to compare it with otherwise)
            accuracy = run_accuracy(model, dtype if dtype != torch.float32 else torch.bfloat16, args.accuracy_blocks)
            model.dit.to(dtype)
            model.dtype = dtype
        if args.compile:  # one compiled graph per transformer block (the cache bookkeeping between them stays eager)
            for block in model.dit.blocks:
                block.compile(dynamic=False)
        peak = measure_matmul_peak(device, dtype)
        batches = [run_batch(model, b, num_blocks, peak, warmup=not args.no_warmup) for b in args.batch]

    is_result = device.type == "cuda" and args.scale == "full"
    return {
        "label": (
            "GPU measurement"
            if is_result
            else "VERIFICATION of the benchmark's code path (not a GPU at full size): NOT a performance result"
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
        "options": {"compile": args.compile, "sdpa": args.sdpa},
        "config": {
            "step_plan": list(gen.step_plan),
            "frames_per_block": gen.frames_per_block,
            "video_frames_per_steady_block": preset.vae.temporal_stride * gen.frames_per_block,
            "tokens_per_frame": preset.tokens_per_frame,
            "text_tokens": preset.text.max_length,
            "sink": gen.sink,
            "sink_frames": gen.sink_frames,
            "window_frames": gen.window_frames,
            "horizon_frames": gen.horizon_frames,
            "t_mci": gen.t_mci,
            "layers": preset.dit.num_layers,
            "dim": preset.dit.dim,
            "dit_parameters": sum(p.numel() for p in model.dit.parameters()),
        },
        "matmul_peak_tflops": peak,
        "analytic_flops": analytic_flops(preset),
        "batches": batches,
        "accuracy": accuracy,
    }


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
        f"{flops['steady_per_video_frame'] / 1e12:.3f} TFLOP per video frame"
    )
    header = [
        "batch",
        "DiT ms/block",
        "decode ms/blk",
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
            f"{b['dit_ms_per_block']:.1f}",
            f"{b['decode_ms_per_block']:.1f}",
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
    p.add_argument("--preset", default="livetalk-1.3b")
    p.add_argument("--height", type=int, default=None, help="default: the preset's")
    p.add_argument("--width", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=None, help="steady-state steps (the step plan's last entry)")
    p.add_argument(
        "--batch",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 2, 4],
        help="comma-separated batch sizes (rows in one engine)",
    )
    p.add_argument("--blocks", type=int, default=None, help="blocks per row (default: past the PSB head and sink)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up render of each batch size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="full",
        help="small: a small config of the preset's family, to verify the code on a CPU (not a result)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--sdpa", choices=SDPA_BACKENDS, default="auto", help="force one SDPA backend")
    p.add_argument("--accuracy", action="store_true", help="also compare --dtype with a float32 render")
    p.add_argument("--accuracy-blocks", type=int, default=2, help="blocks of the accuracy comparison")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--flops-only", action="store_true", help="print the analytic FLOPs of the preset and stop")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.flops_only:
        print_flops(scaled_preset(args.preset, args.scale, args.height, args.width, args.steps))
        return {}
    result = run(args)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
