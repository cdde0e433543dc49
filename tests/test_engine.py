"""The continuously batched engine: a row's frames do not depend on which rows share its batch, rows join and
leave at block boundaries, a failing row leaves alone, rows of different sizes run in different stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_generator import portrait, small_preset, speech

from model.config import RenderSettings
from model.engine import Engine
from model.generator import AvatarModel

LATENT_TOLERANCE = 1e-5  # float32 on a CPU: stacking rows changes only the matmuls' blocking
PIXEL_TOLERANCE = 2  # grey levels


@pytest.fixture(scope="module")
def model() -> AvatarModel:
    return AvatarModel.random(small_preset(), seed=0)


ROWS = [  # (seed, seconds of speech, settings): different lengths, PSB plans, MCI levels, sizes
    (1, 2.0, {}),
    (2, 3.1, {"step_plan": (3, 1)}),
    (3, 1.3, {"t_mci": 0.0}),
    (4, 2.6, {"height": 32, "width": 32}),
]


def open_row(model: AvatarModel, seed: int, seconds: float, settings: dict):
    size = settings.get("height", 16)
    session = model.open(portrait(size), None, RenderSettings(seed=seed, **settings))
    session.feed_audio(speech(seconds, seed=seed), final=True)
    return session


def solo(model: AvatarModel, row) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    session = open_row(model, *row)
    engine = Engine(model)
    engine.add(session)
    latents, frames = [], []
    with torch.no_grad():
        while engine.active:
            for s, block in engine.step():
                latents.append(block.latents)
                frames.append(s.emit(block).frames)
    return latents, frames


def together(model: AvatarModel, rows, join_after: dict | None = None, sessions=None) -> dict:
    """Render rows in one engine; `join_after` = {row index: engine steps before it joins}."""
    join_after = join_after or {}
    sessions = sessions or [open_row(model, *row) for row in rows]
    engine = Engine(model)
    out = {i: ([], []) for i in range(len(sessions))}
    index = {id(s): i for i, s in enumerate(sessions)}
    pending = dict(enumerate(sessions))
    steps, widest = 0, 0
    with torch.no_grad():
        while pending or engine.active:
            for i in [i for i in pending if join_after.get(i, 0) <= steps]:
                engine.add(pending.pop(i))
            widest = max(widest, len(engine.active))
            for s, block in engine.step():
                out[index[id(s)]][0].append(block.latents)
                out[index[id(s)]][1].append(s.emit(block).frames)
            steps += 1
    return {"rows": out, "failures": engine.failures, "widest": widest, "sessions": sessions}


def assert_same_render(a, b) -> None:
    (latents_a, frames_a), (latents_b, frames_b) = a, b
    assert len(latents_a) == len(latents_b)
    for x, y in zip(latents_a, latents_b):
        assert float((x - y).abs().max()) <= LATENT_TOLERANCE * max(1.0, float(y.abs().max()))
    diff = np.abs(np.concatenate(frames_a).astype(int) - np.concatenate(frames_b).astype(int))
    assert diff.max() <= PIXEL_TOLERANCE


def test_a_rows_render_does_not_depend_on_its_batch_mates(model):
    alone = [solo(model, row) for row in ROWS]
    batched = together(model, ROWS)
    assert not batched["failures"] and batched["widest"] == len(ROWS)
    for i in range(len(ROWS)):
        assert_same_render(batched["rows"][i], alone[i])


def test_rows_join_late_and_leave_early(model):
    alone = [solo(model, row) for row in ROWS[:3]]
    batched = together(model, ROWS[:3], join_after={1: 7, 2: 15})  # rows join mid-block of the others
    for i in range(3):
        assert_same_render(batched["rows"][i], alone[i])


def test_a_failing_row_leaves_without_disturbing_the_others(model):
    alone = solo(model, ROWS[0])
    sessions = [open_row(model, *ROWS[0]), open_row(model, *ROWS[1])]
    broken = sessions[1]
    calls = {"n": 0}
    features = broken._audio_features

    def failing(first_latent, n):  # the row's audio breaks in its third block
        calls["n"] += 1
        if first_latent >= 2 * broken.gen.frames_per_block:
            raise RuntimeError("audio decoder gave up")
        return features(first_latent, n)

    broken._audio_features = failing
    batched = together(model, None, sessions=sessions)
    assert [(s is broken, str(e)) for s, e in batched["failures"]] == [(True, "audio decoder gave up")]
    assert len(batched["rows"][1][0]) == 2  # its first two blocks came out before it failed
    assert_same_render(batched["rows"][0], alone)


def test_a_row_resumes_from_its_state_whatever_it_was_batched_with(model):
    """A row rendered in a batch, saved after 3 blocks and restored alone, goes on as its uninterrupted render."""
    from model.generator import RenderState

    row = ROWS[1]
    alone = solo(model, row)
    sessions = [open_row(model, *row), open_row(model, *ROWS[0])]
    engine = Engine(model)
    for s in sessions:
        engine.add(s)
    with torch.no_grad():
        while sessions[0].blocks_done < 3 or engine._blocks[sessions[0]] is not None:
            for s, block in engine.step():
                s.emit(block)
        state = RenderState.from_bytes(sessions[0].state().to_bytes())
        restored = model.restore(state)
        restored.feed_audio(speech(row[1], seed=row[0]), final=True)
        rest = [(b.frames) for b in restored]
    assert restored.blocks_done == len(alone[0])
    diff = np.abs(np.concatenate(rest).astype(int) - np.concatenate(alone[1][3:]).astype(int))
    assert diff.max() <= PIXEL_TOLERANCE
