"""The render actor: one resident model per actor, rendering several rows at once into stored segments.

Used as a callable class in `Dataset.map_batches` (batch_size=1), the pattern of Ray Data's LLM stage: Ray Data
keeps a fixed pool of these actors, each loading `AvatarModel` once in `__init__`, and makes up to
`rows_per_actor` concurrent calls into each (`__call__` is async). Every call hands its row to the actor's one
engine loop (a thread running `model.engine.Engine`), which advances all rows in flight together, pass by pass,
and takes new rows in as others finish. A row's video is cut into segments of K blocks (about 4 s of video unless
set, `PipelineSettings.segment_blocks_for`); each segment is encoded to H.264 (no audio) and stored with the
generator state at its end:

    <output root>/.segments/<row key>/<index>.mp4    then    <index>.state   (the state marks it complete)

The previous segment's state is then deleted (a resume reads only the last, and lists again when an overlapping
attempt of the row deleted the one it listed). A row that finds stored segments restores the last state and renders
only the blocks after it, so a render actor killed mid-row (Ray restarts it and retries its rows) loses at most one
segment of work per row. After every block the row reports progress and learns whether the job was cancelled; a
cancelled row keeps its segments and can resume in a later run. A row that fails leaves the batch; the others go on.
A row whose segment encoder was killed by a signal (the OOM killer; a worker's exit kills its children before the
worker goes) is not at fault: it is opened again from its last stored segment, up to ENCODER_REOPENS times. With
`overlap_decode` the VAE decode and H.264 encode of a block run on a second thread while the engine generates the
next one.
"""

from __future__ import annotations

import asyncio
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import ray

from model.eval.metrics import block_layout
from model.media import EncoderKilledError
from pipeline.events import BlockRendered, RowStarted, RowStatus
from pipeline.model_cache import local_checkpoint
from pipeline.records import RowRecord, array_from_bytes
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore

MP4, STATE = ".mp4", ".state"
ENCODER_REOPENS = 2  # a row whose ffmpeg keeps being killed fails after this many reopens
STATE_LOOKUPS = 3  # times a resume lists the row's states again when the one it listed is gone


def segment_uri(prefix: str, index: int, suffix: str) -> str:
    return f"{prefix}/{index:06d}{suffix}"


def last_complete_segment(store: ObjectStore, prefix: str) -> int | None:
    """Index of the last segment stored with its state (segments are written in order), or None."""
    states = [u for u in store.list(prefix) if u.endswith(STATE)]
    return max((int(os.path.basename(u)[: -len(STATE)]) for u in states), default=None)


def last_stored_state(store: ObjectStore, prefix: str) -> tuple[int, bytes] | None:
    """The last complete segment's index and its state's bytes, or None when no segment is stored. Another attempt
    of the same row (a retry overlapping one still running) stores newer segments and deletes the state before its
    newest, so the state listed can be gone when it is read: then the newer one is listed and read instead."""
    for lookup in range(STATE_LOOKUPS):
        index = last_complete_segment(store, prefix)
        if index is None and lookup == 0:
            return None
        if index is None:  # every state went: the other attempt finished the row and its writer took the segments
            raise RuntimeError(f"{prefix}: the row's stored segments were removed while it resumed (another attempt)")
        try:
            return index, store.get_bytes(segment_uri(prefix, index, STATE))
        except FileNotFoundError:
            continue
    raise RuntimeError(f"{prefix}: the last stored state kept vanishing while it was read ({STATE_LOOKUPS} lookups)")


class RowRender:
    """One row in the engine: its session, its open segment, its progress; the engine loop drives it."""

    def __init__(self, actor: BatchRenderer, record: RowRecord, resolve, reopens: int = 0):
        self.renderer, self.record, self.task = actor, record, record.task
        self.resolve = resolve  # hands the finished record back to the waiting call
        self.reopens = reopens  # times this row was opened again after its encoder was killed
        self.inputs = (record.portrait, record.audio)  # kept for a reopen; the record travels without them
        self.reopen = False  # set by close: render the row again instead of resolving it
        self.started = time.perf_counter()
        self.session = None
        self.writer = None
        # The row's index in the name says whose encoder an ffmpeg process is (tests kill one).
        self.tmp = tempfile.TemporaryDirectory(prefix=f"avatar-segment-{record.task.index}-")
        self.segment = 0
        self.blocks_in_segment = 0
        self.resume_from: int | None = None
        self.rows_in_batch = 0
        self.generate_seconds = 0.0  # wall time of the engine steps it was in (shared with its batch mates)
        self.block_started = time.perf_counter()
        self.cancelled = False
        self.pending: list[Future] = []  # blocks handed to the decode thread, in order

    def open(self) -> None:
        from model.generator import RenderState

        renderer, task = self.renderer, self.task
        stored = last_stored_state(renderer.store, task.segments)
        if stored is None:
            self.resume_from = None
            self.session = renderer.model.open(array_from_bytes(self.record.portrait), task.prompt, task.render)
        else:
            self.resume_from, state = stored
            self.session = renderer.model.restore(RenderState.from_bytes(state), task.prompt)
            self.segment = self.resume_from + 1
        self.session.feed_audio(array_from_bytes(self.record.audio), final=True)
        self.record.portrait = self.record.audio = b""  # the writer needs neither; keep the object store light
        started = RowStarted(renderer.job_id, task.id, renderer.actor_id, self.session.blocks_done, self.reopens > 0)
        self.cancelled = renderer.report([started])

    def reopened(self) -> RowRender:
        """This row again, from its last stored segment (its encoder was killed); its timings carry on."""
        again = RowRender(self.renderer, self.record, self.resolve, self.reopens + 1)
        again.started, again.generate_seconds, again.rows_in_batch = (
            self.started,
            self.generate_seconds,
            self.rows_in_batch,
        )
        return again

    def on_block(self, generated) -> None:
        """A generated block: decode, encode and maybe store a segment (here or on the decode thread)."""
        # A block that failed on the decode thread fails (or reopens) the row now, not after its last block.
        while self.pending and self.pending[0].done():
            self.pending.pop(0).result()
        now = time.perf_counter()
        seconds, self.block_started = now - self.block_started, now
        state = None
        if self.blocks_in_segment + 1 == self.renderer.segment_blocks or self.session.finished:
            state = self.session.state()  # taken now, at the block boundary: the next block is being generated
        self.blocks_in_segment = 0 if state is not None else self.blocks_in_segment + 1
        if self.renderer.decoder is None:
            self._write_block(generated, state, seconds)
            return
        ready = None
        if self.renderer.decode_stream is not None:  # the decode waits for the block on its own CUDA stream
            import torch

            ready = torch.cuda.Event()
            ready.record()
            generated.latents.record_stream(self.renderer.decode_stream)
        self.pending.append(self.renderer.decoder.submit(self._write_block, generated, state, seconds, ready))

    def _write_block(self, generated, state, seconds: float, ready=None) -> None:
        from model.media import VideoWriter

        stream = self.renderer.decode_stream
        if stream is None:
            block = self.session.emit(generated)
        else:
            import torch

            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                block = self.session.emit(generated)
        if self.writer is None:
            height, width = block.frames.shape[1:3]
            self.writer = VideoWriter(
                os.path.join(self.tmp.name, f"{self.segment}{MP4}"), self.session.fps, width, height
            )
        self.writer.write(block.frames)
        if state is not None:
            self._store_segment(state)
        renderer, frames = self.renderer, len(block.frames)
        event = BlockRendered(
            renderer.job_id, self.task.id, renderer.actor_id, block.index, frames, frames / self.session.fps, seconds
        )
        self.cancelled = self.renderer.report([event]) or self.cancelled

    def _store_segment(self, state) -> None:
        """Close and upload a segment, then its state: a segment counts only once its state exists. Only the last
        state is ever read (a resume), so the one before it goes: a row keeps one state, however long it is."""
        store, prefix = self.renderer.store, self.task.segments
        self.writer.close()
        store.put_file(segment_uri(prefix, self.segment, MP4), self.writer.path)
        store.put_bytes(segment_uri(prefix, self.segment, STATE), state.to_bytes())
        if self.segment > 0:
            store.delete(segment_uri(prefix, self.segment - 1, STATE))
        os.remove(self.writer.path)
        self.writer, self.segment = None, self.segment + 1

    def drain(self) -> None:
        """Wait for all of this row's blocks on the decode thread, then raise the first error one of them raised
        (the writer is not touched again until none is running)."""
        pending, self.pending = self.pending, []
        errors = [future.exception() for future in pending]  # waits for each
        first = next((err for err in errors if err is not None), None)
        if first is not None:
            raise first

    def close(self, error: Exception | None = None) -> RowRecord:
        """The row's record once it left the engine: rendered, cancelled or failed."""
        record, session = self.record, self.session
        try:
            self.drain()
        except Exception as err:  # an encode or upload of this row failed on the decode thread
            error = error or err
        if self.writer is not None and (error is not None or self.cancelled):
            self.writer.abort()  # an unfinished segment is rendered again on resume
        self.tmp.cleanup()
        if isinstance(error, EncoderKilledError) and self.reopens < ENCODER_REOPENS and not self.cancelled:
            self.reopen = True
            record.portrait, record.audio = self.inputs
            return record
        if error is not None:
            record.fail("render", f"{type(error).__name__}: {error}")
        elif self.cancelled:
            record.status, record.error_kind = RowStatus.CANCELLED, "cancelled"
            record.error = f"cancelled after {session.blocks_done} blocks (segments kept for resume)"
        elif session.frames_done == 0:
            record.fail("input", f"{self.task.audio}: audio too short to render a single frame")
        else:
            record.status = RowStatus.RENDERED
            record.timings["generate"] = self.generate_seconds
            record.result = {
                "frames": session.frames_done,
                "fps": session.fps,
                "video_seconds": session.frames_done / session.fps,
                "blocks": session.blocks_done,
                "block_layout": block_layout(session.stride, session.gen.frames_per_block),  # the report's seams
                "segments": self.segment,
                "resumed_from_segment": self.resume_from,
                "actor_id": self.renderer.actor_id,
                "rows_in_batch": self.rows_in_batch,
            }
        record.portrait = record.audio = b""
        record.timings["render"] = time.perf_counter() - self.started
        return record


class BatchRenderer:
    """The render actor's work without Ray: rows go in (`submit`), up to `rows_per_actor` render together in one
    engine loop on its own thread, and each row's record comes back through its `resolve` callback. `report`
    receives every row's progress events and answers whether the job was cancelled."""

    def __init__(self, model, store: ObjectStore, settings: PipelineSettings, job_id: str, actor_id: str, report):
        from model.engine import Engine

        self.model, self.store, self.settings = model, store, settings
        self.segment_blocks = settings.segment_blocks_for(model.preset)
        self.job_id, self.actor_id, self.report = job_id, actor_id, report
        overlap = settings.overlap_decode == "on" or (settings.overlap_decode == "auto" and settings.device == "cuda")
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="render-decode") if overlap else None
        # On a GPU the decode runs on its own CUDA stream too, so the VAE's kernels overlap the DiT's.
        self.decode_stream = None
        if overlap and settings.device == "cuda":
            import torch

            self.decode_stream = torch.cuda.Stream()
        self.engine = Engine(model)
        self.step_seconds = 0.0  # time in engine steps (generation), for benchmarks/actor_batching.py
        self._inbox: queue.Queue = queue.Queue()
        self._loop = threading.Thread(target=self._run_engine, name="render-engine", daemon=True)
        self._loop.start()

    def submit(self, record: RowRecord, resolve) -> None:
        """Queue a row; `resolve(record)` is called from the engine thread when it is rendered, cancelled or failed."""
        self._inbox.put(RowRender(self, record, resolve))

    def render(self, record: RowRecord) -> RowRecord:
        """One row, waited for."""
        done: Future = Future()
        self.submit(record, done.set_result)
        return done.result()

    # -- the engine loop (one thread) --------------------------------------------------------------------------

    def _run_engine(self) -> None:
        rows: dict = {}  # session -> RowRender
        while True:
            try:
                self._admit(rows, wait=not rows)
                if rows:
                    self._step(rows)
            except Exception as err:  # a bug of the loop itself: fail the rows in flight, keep serving
                for session in list(rows):
                    self.engine.remove(session)
                    self._finish(rows.pop(session), err)

    def _step(self, rows: dict) -> None:
        """One engine step: a pass of every row; finished blocks to their rows; rows that end leave."""
        width = len(self.engine.active)
        tick = time.perf_counter()
        finished = self.engine.step()
        seconds = time.perf_counter() - tick
        self.step_seconds += seconds
        for row in rows.values():
            row.rows_in_batch = max(row.rows_in_batch, width)
            row.generate_seconds += seconds
        for session, generated in finished:
            try:
                rows[session].on_block(generated)
            except Exception as err:  # this row's encode or upload: fail it, keep the others
                self.engine.remove(session)
                self._finish(rows.pop(session), err)
        for session, err in self.engine.failures:
            if session in rows:
                self._finish(rows.pop(session), err)
        self.engine.failures.clear()
        for session, row in list(rows.items()):
            if row.cancelled or session.finished:
                self.engine.remove(session)
                self._finish(rows.pop(session))

    def _admit(self, rows: dict, wait: bool) -> None:
        """Take in the rows waiting in the inbox (blocking for one when the engine is idle)."""
        while True:
            try:
                item = self._inbox.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if item.record.status != RowStatus.PENDING:
                item.tmp.cleanup()
                item.resolve(item.record)
                continue
            try:
                item.open()
            except Exception as err:  # a bad state or input of this row: fail it alone
                self._finish(item, err)
                continue
            self.engine.add(item.session)
            rows[item.session] = item

    def _finish(self, row: RowRender, error: Exception | None = None) -> None:
        record = row.close(error)
        if row.reopen:  # from its last stored segment, on a later admit
            self._inbox.put(row.reopened())
        else:
            row.resolve(record)


class RenderActor:
    """The Ray Data callable class: loads the model once, and feeds up to `rows_per_actor` concurrent calls into
    one BatchRenderer."""

    def __init__(self, settings: PipelineSettings, job_id: str, progress):
        import torch

        from model.generator import AvatarModel

        if settings.device == "cpu":
            torch.set_num_threads(max(1, round(settings.actor_num_cpus)))
        self.progress = progress
        store = ObjectStore(settings.storage)
        # An s3:// checkpoint is downloaded once per node (verified), not once per actor.
        cache = settings.model_cache_dir and Path(settings.model_cache_dir)
        checkpoint = local_checkpoint(settings.checkpoint, store, cache) if settings.checkpoint else None
        model = AvatarModel.load(
            checkpoint, preset=settings.preset, device=settings.device, dtype=settings.torch_dtype()
        )
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id() or f"local-{os.getpid()}"
        self.renderer = BatchRenderer(model, store, settings, job_id, actor_id, self.report)
        if context.current_actor is not None:
            ray.get(progress.register_render_actor.remote(actor_id, context.current_actor, context.get_node_id()))

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """One of up to `rows_per_actor` concurrent calls: hand the rows to the engine loop and wait for them."""
        loop = asyncio.get_running_loop()
        futures = []
        for row in batch.to_pylist():
            future = loop.create_future()
            resolve = lambda record, future=future: loop.call_soon_threadsafe(future.set_result, record)  # noqa: E731
            self.renderer.submit(RowRecord.from_row(row), resolve)
            futures.append(future)
        records = await asyncio.gather(*futures)
        return pa.Table.from_pylist([r.to_row() for r in records], schema=batch.schema)

    def report(self, events: list) -> bool:
        """Push events; returns whether the job is cancelled (one round trip per block)."""
        return ray.get(self.progress.push_and_check.remote(events))
