"""Ray workers of a job: the progress actor, the resident-model render actor, the writer task.

They are built on pipeline's records (pipeline.events, pipeline.records), so pipeline.job cannot import them;
whoever runs a job (deploy, the CLI) hands them to it: `run_job(spec, settings, job_workers())`.
"""

from __future__ import annotations

from pipeline.job import JobWorkers


def job_workers() -> JobWorkers:
    from actors.progress import ProgressActor  # imports ray: only when a job is about to run
    from actors.render import RenderActor
    from actors.writer import write_row

    return JobWorkers(progress_actor=ProgressActor, render_actor=RenderActor, write_row=write_row)
