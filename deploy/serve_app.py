"""The Ray Serve application: one replica whose FastAPI ingress is `deploy.app.create_app`.

    serve run deploy.serve_app:app                      # settings from AVATAR_RENDER_* / .env
    serve deploy deploy/serve_config.yaml               # on a cluster (see deploy/kuberay/rayservice.yaml)

One replica on purpose: it owns the job store (sqlite in the state dir) and the job workers; rendering scales
through the render-actor pool, not through more HTTP replicas. The replica needs no GPU: render actors
request theirs (`num_gpus=1` when the pipeline's device is "cuda").
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deploy.app import create_app
from deploy.settings import ServiceSettings


@serve.deployment(
    name="avatar-render",
    num_replicas=1,
    max_ongoing_requests=256,  # status polls are cheap; the load benchmark polls 500/s
    ray_actor_options={"num_cpus": 0.5},
)
@serve.ingress()
class RenderService:
    def __init__(self, settings: dict[str, Any] | None = None):
        # Overrides (e.g. from `avatar-render serve`) on top of the environment the replica sees.
        self.settings = ServiceSettings(**(settings or {}))

    def __serve_build_asgi_app__(self):
        # Built on the replica: the job store and worker threads live there. Serve runs the app's lifespan.
        return create_app(self.settings)


def build(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder for `serve run deploy.serve_app:build key=value ...` and `avatar-render serve`."""
    return RenderService.bind(args or {})


app = build()
