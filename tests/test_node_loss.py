"""A Ray node lost mid-job, on a real multi-node cluster (`ray.cluster_utils.Cluster`: a head and two worker
nodes on this machine): every row still succeeds, the row in flight on the lost node resumes from its last
stored segment on the surviving node, no finished segment is rendered again, and the report says which row
was retried."""

from __future__ import annotations

import numpy as np
import pytest
from test_pipeline_run import make_audio, make_portrait

from actors import job_workers
from model.media import read_video
from pipeline.events import BlockRendered, RowStarted
from pipeline.job import JobSpec, progress_actor_name, run_job
from pipeline.settings import PipelineSettings

SECONDS = 3.0  # 75 frames: 7 blocks of the suite's small model (9 frames, then 12 each), each its own segment
ROWS = 3


@pytest.fixture
def three_node_cluster(monkeypatch):
    """Head (no CPUs: only the driver and the job's progress actor) and two worker nodes of 3 logical CPUs,
    room for two render actors and their fetch/write tasks on one node once the other is gone. The session's
    single-node Ray is put back afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    monkeypatch.setenv("RAY_enable_worker_prestart", "0")  # 2 cores: start worker processes only when needed
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_running:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_a_lost_node_costs_no_finished_segment(three_node_cluster, tmp_path):
    import ray

    cluster, workers = three_node_cluster
    make_portrait(tmp_path / "face.png")
    make_audio(tmp_path / "speech.wav", SECONDS)
    same = {"portrait": str(tmp_path / "face.png"), "audio": str(tmp_path / "speech.wav")}
    # Identical inputs: every row's video must come out identical, retried or not (restore is bit-exact on CPU).
    spec = JobSpec(job_id="node-loss", rows=[{"id": f"row-{i}", **same} for i in range(ROWS)], output=str(tmp_path))
    settings = PipelineSettings(num_actors=2, actor_num_cpus=1, segment_blocks=1)
    events, lost = [], {}

    def on_event(event) -> None:
        events.append(event)
        if not lost and isinstance(event, BlockRendered):  # its segment is stored: take its node down
            progress = ray.get_actor(progress_actor_name(spec.job_id))
            node_id = ray.get(progress.get_render_actor_nodes.remote())[event.actor_id]
            (node,) = [w for w in workers if w.node_id == node_id]
            cluster.remove_node(node)
            lost.update(row=event.row_id, node=node_id)

    report = run_job(spec, settings, job_workers(), on_event=on_event)

    assert lost, "no node was removed"
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == {cluster.head_node.node_id} | {
        w.node_id for w in workers if w.node_id != lost["node"]
    }
    assert report.counts == {"succeeded": ROWS}, report.rows
    rows = {row.id: row for row in report.rows}
    retried = rows[lost["row"]]
    # The report names the retried row and where it resumed; the others ran once, from the start.
    assert retried.render_attempts == 2 and retried.resumed_from_segment is not None and retried.frames == 75
    assert all(r.render_attempts == 1 and r.resumed_from_segment is None for r in rows.values() if r is not retried)
    # (A reopen on the dying node, whose worker kills its ffmpeg before it goes, is not an attempt.)
    starts = [e for e in events if isinstance(e, RowStarted) and e.row_id == lost["row"] and not e.reopened]
    assert [s.resumed_from_block for s in starts] == [0, retried.resumed_from_segment + 1], starts
    assert len({s.actor_id for s in starts}) == 1  # the same actor, restarted by Ray off the lost node
    # No finished segment rendered again: every block of every row was rendered exactly once.
    for row_id in rows:
        blocks = [e.block_index for e in events if isinstance(e, BlockRendered) and e.row_id == row_id]
        assert sorted(blocks) == sorted(set(blocks)), (row_id, blocks)
    videos = [read_video(tmp_path / f"{row_id}.mp4")[0] for row_id in rows]
    assert all(v.shape == (75, 64, 64, 3) and np.array_equal(v, videos[0]) for v in videos)
