"""benchmarks/gpu_throughput.py: its CPU-scaled run end to end, and its analytic FLOP count against a brute-force
one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.config import get_preset

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_cpu_scaled_run_writes_the_reported_fields(bench_module, tmp_path):
    out = tmp_path / "perf.json"
    # 5 blocks of the tiny preset (horizon 13): the PSB head (8, 6 steps), steady blocks, and one URCR reset.
    bench_module.main(
        [
            "--device",
            "cpu",
            "--scale",
            "tiny-cpu",
            "--height",
            "32",
            "--width",
            "32",
            "--batch",
            "1,2",
            "--blocks",
            "5",
            "--warmup-blocks",
            "1",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert "NOT a performance result" in result["label"]
    assert result["preset"] == "tiny" and result["dtype"] == "float32"
    assert result["matmul_peak_tflops"] > 0
    assert [b["batch"] for b in result["batches"]] == [1, 2]
    for b in result["batches"]:
        for key in (
            "block_latency_ms",
            "block_e2e_ms",
            "dit_fps",
            "e2e_fps",
            "first_frame_ms",
            "achieved_tflops",
            "mfu",
        ):
            assert b[key] > 0, key
        assert b["peak_memory_gib"] is None  # no GPU
        assert b["first_block_steps"] == 8  # PSB: block 0 gets the plan's first entry
        blocks = b["per_block"]
        assert [blk["steps"] for blk in blocks] == [8, 6, 4, 4, 4]
        assert [blk["video_frames"] for blk in blocks] == [9, 12, 12, 12, 12]
        # Only the fifth block passes the horizon and pays the URCR reset's extra cache-write pass.
        assert blocks[4]["dit_flops"] > blocks[3]["dit_flops"]
        assert b["steady_blocks"] == [2, 3, 4]
        assert b["e2e_fps"] <= b["dit_fps"]  # end to end adds audio and decode to the DiT's time
    b1, b2 = result["batches"]
    assert b2["per_block"][2]["dit_flops"] == 2 * b1["per_block"][2]["dit_flops"]
    flops = result["analytic_flops"]
    assert flops["steady_per_video_frame"] * result["config"]["video_frames_per_steady_block"] == pytest.approx(
        flops["steady_block"]
    )


def test_accuracy_mode_compares_low_precision_with_float32(bench_module):
    # bf16 matmuls are slow on a CPU: one layer, 32x32, one step.
    preset = get_preset("tiny").with_resolution(32, 32)
    preset = preset.model_copy(
        update={
            "dit": preset.dit.model_copy(update={"num_layers": 1}),
            "generator": preset.generator.model_copy(update={"step_plan": (1,)}),
        }
    )
    bench = bench_module.build_bench(preset, torch.device("cpu"), torch.float32, torch.float32)
    acc = bench_module.run_accuracy(bench, torch.bfloat16, 1)
    (error,) = acc["latent_relative_error_per_block"]
    assert 0 < error < 0.1  # bf16 differs from float32, but only by rounding
    assert bench_module.run_accuracy(bench, torch.float32, 1)["latent_relative_error_per_block"] == [0.0]


@pytest.mark.parametrize("injection", ["add", "cross_attn"])
def test_analytic_flops_match_a_brute_force_count(bench_module, injection):
    preset = get_preset("tiny")
    cfg = preset.dit.model_copy(update={"num_layers": 2, "audio_injection": injection})
    preset = preset.model_copy(update={"dit": cfg})
    torch.manual_seed(0)
    dit = bench_module.build_dit(preset, torch.device("cpu"), torch.float32, seed=0)
    gen, s = preset.generator, preset.tokens_per_frame
    text_tokens, frames = 7, gen.frames_per_block
    cache = dit.new_cache(
        batch=2, tokens_per_frame=s, sink_frames=1, window_frames=gen.window_frames, horizon_frames=gen.horizon_frames
    )
    h, w = preset.latent_height, preset.latent_width
    text = torch.randn(2, text_tokens, cfg.dim)
    audio = torch.randn(2, frames, cfg.audio_window, cfg.audio_feature_dim)
    cond = torch.randn(2, cfg.cond_channels, frames, h, w)
    with torch.no_grad():  # fill the sink and one block of the window, so attention runs over a real cache
        dit(
            torch.randn(2, 16, 1, h, w),
            torch.zeros(2, 1),
            text,
            torch.zeros(1),
            cond[:, :, :1],
            audio[:, :1],
            attention="streaming",
            cache=cache,
            write_cache=True,
        )
        cache.commit(1)
        dit(
            torch.randn(2, 16, frames, h, w),
            torch.zeros(2, frames),
            text,
            cache.allocate(frames),
            cond,
            audio,
            attention="streaming",
            cache=cache,
            write_cache=True,
        )
        cache.commit(frames)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:  # the math backend is made of matmuls the counter sees
            dit(
                torch.randn(2, 16, frames, h, w),
                torch.full((2, frames), 500.0),
                text,
                cache.allocate(frames),
                cond,
                audio,
                attention="streaming",
                cache=cache,
            )
    analytic = bench_module.dit_forward_flops(
        cfg, batch=2, frames=frames, tokens_per_frame=s, cache_tokens=(1 + frames) * s, text_tokens=text_tokens
    )
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)
