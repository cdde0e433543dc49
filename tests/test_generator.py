"""The autoregressive generator: resumable state, URCR, PSB, MCI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_parts import small_preset

from model.config import DeflickerConfig, PasteBackConfig
from model.generator import AvatarModel, RenderSettings


def portrait(size: int = 16) -> np.ndarray:
    return (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (rng.random(t.size) > 0.3) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def model() -> AvatarModel:
    torch.manual_seed(0)
    return AvatarModel.random(small_preset(), seed=0)


def render(session, audio) -> list:
    session.feed_audio(audio, final=True)
    return [b.frames for b in session]


def build() -> AvatarModel:
    # The deflicker and the paste-back on, with thresholds nothing reaches: a restored render must rebuild the
    # deflicker's state (the last frame) and paste the same portrait (the state carries it).
    preset = small_preset(
        deflicker=DeflickerConfig(frames=3, threshold=1000.0), paste_back=PasteBackConfig(threshold=1000.0)
    )
    return AvatarModel.random(preset, seed=0)


def run_python(code: str) -> str:
    """Run code in a fresh interpreter that can import this test module's helpers."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    prelude = (
        "import numpy as np\nfrom model.generator import RenderSettings, RenderState\n"
        "from test_generator import build, portrait, speech\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code], check=True, capture_output=True, text=True, env=env
    ).stdout


def test_restore_in_fresh_process_continues_bit_identically(tmp_path):
    """Save mid-render, restore in another process, and compare with an uninterrupted render in a third."""
    full, state_file, tail = tmp_path / "full.npy", tmp_path / "state.bin", tmp_path / "tail.npy"
    start = "m = build(); s = m.open(portrait(), None, RenderSettings(seed=7)); s.feed_audio(speech(6.0), final=True)\n"
    run_python(start + f"np.save({str(full)!r}, np.concatenate([b.frames for b in s]))")
    frames_before = int(
        run_python(
            start + "for _ in range(6): s.next_block()\n"
            f"open({str(state_file)!r}, 'wb').write(s.state().to_bytes()); print(s.frames_done)"
        )
    )
    run_python(
        f"m = build(); s = m.restore(RenderState.from_bytes(open({str(state_file)!r}, 'rb').read()))\n"
        f"s.feed_audio(speech(6.0), final=True); np.save({str(tail)!r}, np.concatenate([b.frames for b in s]))"
    )
    full_frames, tail_frames = np.load(full), np.load(tail)
    assert state_file.stat().st_size < 1_000_000  # small: latents and counters, not caches
    assert 0 < frames_before < len(full_frames)
    assert len(tail_frames) == len(full_frames) - frames_before
    assert np.array_equal(tail_frames, full_frames[frames_before:])


def test_urcr_keeps_positions_in_horizon_and_cache_fixed(model):
    session = model.open(portrait(), None, RenderSettings(seed=1, step_plan=(1,)))
    gen = session.gen
    seconds = 200 * gen.frames_per_block * 4 / 25 + 1  # audio for 200+ blocks
    session.feed_audio(speech(seconds), final=True)
    positions, sizes = [], set()
    original = session.model.dit.forward

    def spy(x, t, text, frame_positions, *args, **kwargs):
        positions.append(frame_positions.clone())
        return original(x, t, text, frame_positions, *args, **kwargs)

    session.model.dit.forward = spy
    try:
        blocks = 0
        for _ in session:
            blocks += 1
            sizes.add((session.cache.keys.shape, session.cache.valid_tokens() <= session.cache.keys.shape[2]))
    finally:
        del session.model.dit.forward
    assert blocks >= 200
    every = torch.cat(positions)
    assert every.max() < gen.horizon_frames and every.min() >= 0
    assert session.cache.resets >= blocks * gen.frames_per_block // gen.horizon_frames
    assert len(sizes) == 1  # the cache never grows


def test_urcr_off_lets_positions_grow_past_the_horizon(model):
    """The ablation switch: without URCR, positions run past the trained horizon and the cache never resets
    (until the RoPE table ends, far beyond this render)."""
    session = model.open(portrait(), None, RenderSettings(seed=1, step_plan=(1,), urcr=False))
    gen = model.preset.generator
    session.feed_audio(speech(8 * gen.frames_per_block * 4 / 25), final=True)
    blocks = sum(1 for _ in session)
    assert blocks >= 8
    assert session.cache.resets == 0
    assert session.cache.next_position > gen.horizon_frames
    assert session.gen.horizon_frames == model.preset.dit.rope_max_positions


def writes(write_cache: bool | list[bool]) -> bool:
    """Whether a forward pass writes the cache (one flag per batch row, or one for all)."""
    return any(write_cache) if isinstance(write_cache, list) else write_cache


def count_forwards(session) -> list[int]:
    """Denoising passes (no cache write) per block."""
    calls = []
    original = session.model.dit.forward

    def spy(*args, write_cache=False, **kwargs):
        if not writes(write_cache):
            calls[-1] += 1
        return original(*args, write_cache=write_cache, **kwargs)

    session.model.dit.forward = spy
    try:
        while True:
            calls.append(0)
            if session.next_block() is None:
                calls.pop()
                return calls
    finally:
        del session.model.dit.forward


def test_psb_steps_per_block_follow_the_plan(model):
    session = model.open(portrait(), None, RenderSettings(seed=2, step_plan=(5, 3, 2)))
    session.feed_audio(speech(3.0), final=True)
    steps = count_forwards(session)
    assert steps[:3] == [5, 3, 2] and set(steps[3:]) == {2}


def capture_context_writes(session):
    captured = []
    original = session.model.dit.forward

    def spy(x, t, *args, write_cache=False, **kwargs):
        if writes(write_cache):
            captured.append((x.clone(), t.clone()))
        return original(x, t, *args, write_cache=write_cache, **kwargs)

    session.model.dit.forward = spy
    return captured


@pytest.mark.parametrize("t_mci", [0.0, 200.0])
def test_mci_context_writes(model, t_mci):
    """t_mci = 0 writes exactly the clean block at t = 0 (Self-Forcing); t_mci > 0 writes it noised at t_mci."""
    session = model.open(portrait(), None, RenderSettings(seed=3, step_plan=(2,), t_mci=t_mci))
    session.feed_audio(speech(2.0), final=True)
    writes = capture_context_writes(session)
    try:
        session.next_block()
        clean = session.recent[:, :, -session.gen.frames_per_block :]
    finally:
        del session.model.dit.forward
    x, t = writes[-1]
    assert torch.all(t == t_mci)
    if t_mci == 0:
        assert torch.equal(x, clean)
    else:
        sigma = t_mci / 1000
        noise = (x - (1 - sigma) * clean) / sigma
        assert not torch.allclose(x, clean)
        assert 0.8 < noise.std() < 1.2  # what was added is unit Gaussian noise scaled to the level


def test_last_block_is_trimmed_to_the_audio(model):
    for seconds in (0.5, 1.37, 2.0):
        session = model.open(portrait(), None, RenderSettings(seed=4, step_plan=(1,)))
        frames = np.concatenate(render(session, speech(seconds)))
        assert len(frames) == int(np.ceil(seconds * 25)) == session.total_frames


def test_audio_can_arrive_in_chunks(model):
    audio = speech(2.5)
    whole = np.concatenate(render(model.open(portrait(), None, RenderSettings(seed=5, step_plan=(1,))), audio))
    session = model.open(portrait(), None, RenderSettings(seed=5, step_plan=(1,)))
    chunks = []
    for piece in np.array_split(audio, 9):
        session.feed_audio(piece)
        chunks += [b.frames for b in session]
    session.feed_audio(np.zeros(0, np.float32), final=True)
    chunks += [b.frames for b in session]
    assert np.array_equal(np.concatenate(chunks), whole)


def test_zero_length_audio_is_an_error(model):
    session = model.open(portrait(), None, RenderSettings())
    with pytest.raises(ValueError, match="zero-length"):
        session.feed_audio(np.zeros(0, np.float32), final=True)


def test_audio_held_by_a_streaming_render_stays_bounded(model):
    """Read audio is dropped: a long stream keeps a constant amount of audio, and the frames are unchanged."""
    audio = speech(12.0)
    whole = np.concatenate(render(model.open(portrait(), None, RenderSettings(seed=6, step_plan=(1,))), audio))
    session = model.open(portrait(), None, RenderSettings(seed=6, step_plan=(1,)))
    held, frames = [], []
    for piece in np.array_split(audio, 48):
        session.feed_audio(piece)
        frames += [b.frames for b in session]
        held.append(session.audio.samples.size)
    session.feed_audio(np.zeros(0, np.float32), final=True)
    frames += [b.frames for b in session]
    assert np.array_equal(np.concatenate(frames), whole)
    assert session.audio.start > 0 and max(held[24:]) <= 3 * 16000  # at most ~3 s held, whatever the length
