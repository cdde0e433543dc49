"""The one generation engine: renders advance block by block, and every network pass of every active render runs
stacked with the passes of the others (continuous batching, DESIGN 3.6).

A render's block is a coroutine (`RenderSession.block_passes`) that yields `Pass`es (a denoising step, a cache
write, a URCR re-write) and receives each pass's network output; between two passes it samples, pins, re-noises and
commits on its own. The engine only stacks what the coroutines ask for, so the block loop has one home and a row's
result does not depend on its batch mates: each row keeps its own KV cache, positions, timesteps, audio, prompt and
random generator, and attention runs over each row's own cache.

    engine = Engine(model)
    engine.add(session_a); engine.add(session_b)
    while engine.active:
        for session, generated in engine.step():  # one pass of every active row; a block as it ends
            block = session.emit(generated)         # decode (the caller may do it on another thread, in order)

A single render is the same engine with one row (`run_block`).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass

import torch

from model.dit import CausalWanDiT
from model.kv_cache import KVCache


@dataclass
class Pass:
    """One streaming forward pass of one render: `n` latent frames at one timestep."""

    latents: torch.Tensor  # (1, C, n, h, w) network input
    timestep: float
    positions: torch.Tensor  # (n,) temporal RoPE positions
    cond: torch.Tensor  # (1, cond_channels, n, h, w) reference latent | mask
    audio: torch.Tensor  # (1, n, audio_window, audio_feature_dim)
    text: torch.Tensor  # (1, Lt, dim) embedded prompt
    cache: KVCache
    write: bool  # store this pass's keys/values (the caller commits them)
    grad: bool = False  # run with autograd (training rollouts' exit step)

    def group_key(self) -> tuple:
        """Passes with equal keys stack into one forward (same frame count, size, prompt length, dtype, autograd)."""
        return (*self.latents.shape[2:], self.text.shape[1], self.latents.dtype, self.grad)


# A block: yields passes, receives each one's network output, returns the block (model.generator.GeneratedBlock).
BlockPasses = Generator[Pass, torch.Tensor, "GeneratedBlock"]  # noqa: F821 (model.generator imports this module)


def forward_passes(dit: CausalWanDiT, passes: list[Pass]) -> list[torch.Tensor]:
    """Run passes of equal `group_key` as one batched streaming forward; one output (1, C, n, h, w) per pass."""
    n = passes[0].latents.shape[2]
    with torch.set_grad_enabled(passes[0].grad and torch.is_grad_enabled()):
        out = dit(
            torch.cat([p.latents for p in passes]),
            torch.cat([torch.full((1, n), float(p.timestep), device=p.latents.device) for p in passes]),
            torch.cat([p.text for p in passes]),
            torch.stack([p.positions for p in passes]) if len(passes) > 1 else passes[0].positions,
            torch.cat([p.cond for p in passes]),
            torch.cat([p.audio for p in passes]),
            attention="streaming",
            cache=[p.cache for p in passes],
            write_cache=[p.write for p in passes],
        )
    return list(out.split(1))


def run_block(dit: CausalWanDiT, block: BlockPasses):
    """Drive one block to its end, one pass at a time (the engine with one row)."""
    try:
        step = next(block)
        while True:
            step = block.send(forward_passes(dit, [step])[0])
    except StopIteration as done:
        return done.value


class Engine:
    """Continuous batching of render sessions of one model: rows join at any time and leave when they finish (or
    fail); each `step` runs one pass of every row that has one, stacking rows whose passes have the same shape."""

    def __init__(self, model):
        self.model = model
        self._blocks: dict = {}  # session -> its running block coroutine and the pass it waits on
        self.failures: list[tuple] = []  # (session, exception) of rows that failed and left

    def add(self, session) -> None:
        if session.model is not self.model:
            raise ValueError("a session joins the engine of its own model")
        self._blocks[session] = None

    def remove(self, session) -> None:
        self._blocks.pop(session, None)

    @property
    def active(self) -> list:
        return list(self._blocks)

    def step(self) -> list[tuple]:
        """One pass of every ready row; returns (session, GeneratedBlock) for the blocks finished in it, to be
        decoded by `session.emit` in order. A row whose audio has not arrived waits; a row whose blocks are all
        generated leaves; a row that raises leaves with its error in `failures`."""
        finished: list[tuple] = []
        waiting: dict = {}
        for session in list(self._blocks):
            pending = self._blocks[session]
            if pending is None:
                if session.finished:
                    self.remove(session)
                    continue
                if not session.ready():
                    continue
                pending = self._advance(session, session.block_passes(), None, finished)
                if pending is None:
                    continue
            waiting[session] = pending
        for group in _groups(waiting.items()):
            try:
                outputs = forward_passes(self.model.dit, [p for _, (_, p) in group])
            except Exception as err:  # a shape or device error of the whole group: fail its rows, keep the rest
                for session, _ in group:
                    self._fail(session, err)
                continue
            for (session, (block, _)), out in zip(group, outputs):
                self._advance(session, block, out, finished)
        return finished

    def _advance(self, session, block: BlockPasses, output: torch.Tensor | None, finished: list):
        """Send a pass's output to a row's block; returns (block, next pass), or None when the block ended."""
        try:
            step = next(block) if output is None else block.send(output)
        except StopIteration as done:
            self._blocks[session] = None
            finished.append((session, done.value))
            return None
        except Exception as err:
            self._fail(session, err)
            return None
        self._blocks[session] = (block, step)
        return self._blocks[session]

    def _fail(self, session, err: Exception) -> None:
        self.remove(session)
        self.failures.append((session, err))


def _groups(waiting: Iterable) -> list[list]:
    groups: dict[tuple, list] = {}
    for session, (block, step) in waiting:
        groups.setdefault(step.group_key(), []).append((session, (block, step)))
    return list(groups.values())
