"""benchmarks/gpu_throughput.py: its small-scale run end to end through the product's engine, and its analytic FLOP
count against a brute-force one."""

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
REQUIRED = ("dit_ms_per_block", "decode_ms_per_block", "dit_fps", "e2e_fps", "first_frame_ms", "achieved_tflops", "mfu")


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_small_run_of_tiny_goes_through_the_engine(bench_module, tmp_path):
    out = tmp_path / "perf.json"
    # 5 blocks of the tiny preset (horizon 13): the PSB head (8, 6 steps), steady blocks, and one URCR reset.
    argv = ["--preset", "tiny", "--device", "cpu", "--scale", "small", "--height", "32", "--width", "32"]
    bench_module.main([*argv, "--batch", "1,2", "--blocks", "5", "--no-warmup", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "NOT a performance result" in result["label"]
    assert result["preset"] == "tiny" and result["dtype"] == "float32"
    assert result["matmul_peak_tflops"] > 0
    assert [b["batch"] for b in result["batches"]] == [1, 2]
    for b in result["batches"]:
        assert all(b[key] > 0 for key in REQUIRED)
        assert b["peak_memory_gib"] is None  # no GPU
        blocks = b["per_block"]
        # Engine passes per block: the reference sink's write, then the PSB plan's steps + the MCI write; the fifth
        # block passes the horizon and pays the URCR reset's write, and as the last block writes no context.
        assert [blk["passes"] for blk in blocks] == [1 + 8 + 1, 6 + 1, 4 + 1, 4 + 1, 1 + 4]
        stride, per_block = get_preset("tiny").vae.temporal_stride, get_preset("tiny").generator.frames_per_block
        first = 1 + stride * (per_block - 1)  # the causal VAE's first latent frame is one video frame
        assert [blk["video_frames"] for blk in blocks] == [first] + [stride * per_block] * 4
        assert [blk["rows"] for blk in blocks] == [b["batch"]] * 5
        assert b["steady_blocks"] == [2, 3, 4]
        assert b["e2e_fps"] <= b["dit_fps"]  # end to end adds the decode to the DiT's time
    b1, b2 = result["batches"]
    assert b2["per_block"][2]["dit_flops"] == 2 * b1["per_block"][2]["dit_flops"]
    flops = result["analytic_flops"]
    assert flops["steady_per_video_frame"] * result["config"]["video_frames_per_steady_block"] == pytest.approx(
        flops["steady_block"]
    )


def test_small_run_of_livetalk_with_accuracy(bench_module):
    """The LiveTalk path at a small size: first-frames sink, 4 re-noised steps, whole-clip wav2vec2 features."""
    argv = ["--preset", "livetalk-1.3b", "--device", "cpu", "--scale", "small", "--batch", "2", "--no-warmup"]
    result = bench_module.main([*argv, "--accuracy", "--accuracy-blocks", "1"])
    assert result["config"]["sink"] == "first_frames" and result["config"]["step_plan"] == [4]
    (b,) = result["batches"]
    assert all(b[key] > 0 for key in REQUIRED)
    blocks = b["blocks"]
    assert [blk["passes"] for blk in b["per_block"]] == [4 + 1] * (blocks - 1) + [4]  # the last writes no context
    (error,) = result["accuracy"]["latent_relative_error_per_block"]
    assert 0 < error < 0.1  # bf16 differs from float32, but only by rounding


@pytest.mark.parametrize("variant", ["add", "cross_attn", "livetalk"])
def test_analytic_flops_match_a_brute_force_count(bench_module, variant):
    if variant == "livetalk":
        preset = bench_module.scaled_preset("livetalk-1.3b", "small", None, None, None)
    else:
        preset = get_preset("tiny")
        cfg = preset.dit.model_copy(update={"num_layers": 2, "audio_injection": variant})
        preset = preset.model_copy(update={"dit": cfg})
    cfg = preset.dit
    model = bench_module.build_model(preset, torch.device("cpu"), torch.float32)
    dit = model.dit
    gen, s = preset.generator, preset.tokens_per_frame
    text_tokens, frames = 7, gen.frames_per_block
    caches = [
        dit.new_cache(
            tokens_per_frame=s,
            sink_frames=gen.sink_frames,
            window_frames=gen.window_frames,
            horizon_frames=gen.horizon_frames,
        )  # fmt: skip
        for _ in range(2)
    ]
    h, w = preset.latent_height, preset.latent_width
    text = torch.randn(2, text_tokens, cfg.dim)
    audio = torch.randn(2, frames, cfg.audio_window, cfg.audio_feature_dim)
    cond = torch.randn(2, cfg.cond_channels, frames, h, w)

    def write(n: int) -> None:
        positions = torch.stack([c.allocate(n) for c in caches])
        dit(torch.randn(2, 16, n, h, w), torch.zeros(2, n), text, positions, cond[:, :, :n], audio[:, :n],
            attention="streaming", cache=caches, write_cache=True)  # fmt: skip
        for c in caches:
            c.commit(n)

    with torch.no_grad():  # fill part of the cache, so attention runs over a real one
        write(1)
        write(frames)
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:  # the math backend is made of matmuls the counter sees
            positions = torch.stack([c.allocate(frames) for c in caches])
            dit(torch.randn(2, 16, frames, h, w), torch.full((2, frames), 500.0), text, positions, cond, audio,
                attention="streaming", cache=caches)  # fmt: skip
    analytic = bench_module.dit_forward_flops(
        cfg, batch=2, frames=frames, tokens_per_frame=s, cache_tokens=caches[0].valid_tokens(), text_tokens=text_tokens
    )
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)
