"""The render actor: one resident model per actor, rendering rows block by block into stored segments.

Used as a callable class in `Dataset.map_batches` (batch_size=1): Ray Data keeps a fixed pool of these
actors, each loading `AvatarModel` once in `__init__`. A row's video is cut into segments of K blocks;
each segment is encoded to H.264 (no audio) and stored with the generator state at its end:

    <output root>/.segments/<row key>/<index>.mp4    then    <index>.state   (the state marks it complete)

A row that finds stored segments restores the last state and renders only the blocks after it, so a
render actor killed mid-row (Ray restarts it and retries the batch) loses at most one segment of work.
After every block the actor reports progress and learns whether the job was cancelled; a cancelled
row keeps its segments and can resume in a later run.
"""

from __future__ import annotations

import os
import tempfile
import time

import pyarrow as pa
import ray

from pipeline.events import BlockRendered, RowStarted, RowStatus
from pipeline.model_cache import local_checkpoint
from pipeline.records import RowRecord, array_from_bytes
from pipeline.settings import PipelineSettings
from pipeline.storage import ObjectStore

MP4, STATE = ".mp4", ".state"


def segment_uri(prefix: str, index: int, suffix: str) -> str:
    return f"{prefix}/{index:06d}{suffix}"


def last_complete_segment(store: ObjectStore, prefix: str) -> int | None:
    """Index of the last segment stored with its state (segments are written in order), or None."""
    states = [u for u in store.list(prefix) if u.endswith(STATE)]
    return max((int(os.path.basename(u)[: -len(STATE)]) for u in states), default=None)


class RenderActor:
    def __init__(self, settings: PipelineSettings, job_id: str, progress):
        import torch

        from model.generator import AvatarModel

        if settings.device == "cpu":
            torch.set_num_threads(max(1, round(settings.actor_num_cpus)))
        self.settings, self.job_id, self.progress = settings, job_id, progress
        self.store = ObjectStore(settings.storage)
        # An s3:// checkpoint is downloaded once per node (verified), not once per actor.
        checkpoint = local_checkpoint(settings.checkpoint, self.store) if settings.checkpoint else None
        self.model = AvatarModel.load(
            checkpoint, preset=settings.preset, device=settings.device, dtype=settings.torch_dtype()
        )
        context = ray.get_runtime_context()
        self.actor_id = context.get_actor_id() or f"local-{os.getpid()}"
        if context.current_actor is not None:
            ray.get(progress.register_render_actor.remote(self.actor_id, context.current_actor))

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = [self.render(RowRecord.from_row(row)) for row in batch.to_pylist()]
        return pa.Table.from_pylist([r.to_row() for r in records], schema=batch.schema)

    def _report(self, events: list) -> bool:
        """Push events; returns whether the job is cancelled (one round trip per block)."""
        return ray.get(self.progress.push_and_check.remote(events))

    def render(self, record: RowRecord) -> RowRecord:
        if record.status != RowStatus.PENDING:
            return record
        started = time.perf_counter()
        try:
            self._render_segments(record)
        except Exception as err:  # a bug or resource failure in this row: fail the row, keep the actor
            record.fail("render", f"{type(err).__name__}: {err}")
        record.portrait = record.audio = b""  # the writer needs neither; keep the object store light
        record.timings["render"] = time.perf_counter() - started
        return record

    def _render_segments(self, record: RowRecord) -> None:
        from model.generator import RenderState
        from model.media import VideoWriter

        task, blocks_per_segment = record.task, self.settings.segment_blocks
        resume_from = last_complete_segment(self.store, task.segments)
        if resume_from is None:
            session = self.model.open(array_from_bytes(record.portrait), task.prompt, task.render)
            segment = 0
        else:
            state = RenderState.from_bytes(self.store.get_bytes(segment_uri(task.segments, resume_from, STATE)))
            session = self.model.restore(state, task.prompt)
            segment = resume_from + 1
        session.feed_audio(array_from_bytes(record.audio), final=True)
        cancelled = self._report([RowStarted(self.job_id, task.id, self.actor_id, session.blocks_done)])

        generate_seconds = 0.0
        with tempfile.TemporaryDirectory(prefix="avatar-segment-") as tmp:
            writer, blocks_in_segment = None, 0
            while not cancelled:
                tick = time.perf_counter()
                block = session.next_block()
                seconds = time.perf_counter() - tick
                if block is None:
                    break
                generate_seconds += seconds
                if writer is None:
                    height, width = block.frames.shape[1:3]
                    writer = VideoWriter(os.path.join(tmp, f"{segment}{MP4}"), session.fps, width, height)
                writer.write(block.frames)
                blocks_in_segment += 1
                event = BlockRendered(
                    self.job_id,
                    task.id,
                    self.actor_id,
                    block.index,
                    len(block.frames),
                    len(block.frames) / session.fps,
                    seconds,
                )
                if blocks_in_segment == blocks_per_segment:
                    self._store_segment(task, segment, writer, session)
                    writer, blocks_in_segment, segment = None, 0, segment + 1
                cancelled = self._report([event])
            if cancelled:
                if writer is not None:
                    writer.abort()  # an unfinished segment is re-rendered on resume
                record.status, record.error_kind = RowStatus.CANCELLED, "cancelled"
                record.error = f"cancelled after {session.blocks_done} blocks (segments kept for resume)"
                return
            if writer is not None:
                self._store_segment(task, segment, writer, session)
                segment += 1
        if session.frames_done == 0:
            record.fail("input", f"{task.audio}: audio too short to render a single frame")
            return
        record.status = RowStatus.RENDERED
        record.timings["generate"] = generate_seconds
        record.result = {
            "frames": session.frames_done,
            "fps": session.fps,
            "video_seconds": session.frames_done / session.fps,
            "blocks": session.blocks_done,
            "segments": segment,
            "resumed_from_segment": resume_from,
            "actor_id": self.actor_id,
        }

    def _store_segment(self, task, segment: int, writer, session) -> None:
        """Close and upload a segment, then its state: a segment counts only once its state exists."""
        writer.close()
        self.store.put_file(segment_uri(task.segments, segment, MP4), writer.path)
        self.store.put_bytes(segment_uri(task.segments, segment, STATE), session.state().to_bytes())
        os.remove(writer.path)
