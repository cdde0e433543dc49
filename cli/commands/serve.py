"""`avatar-render serve`: the HTTP job service, on Ray Serve (default) or plain uvicorn (`--uvicorn`, local dev)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="run the HTTP job service (Ray Serve, or uvicorn for local dev)")
    parser.add_argument("--host", help="bind address (default: AVATAR_RENDER_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: AVATAR_RENDER_PORT or 8000)")
    parser.add_argument(
        "--token", help="bearer token for /v1 (default: AVATAR_RENDER_AUTH_TOKEN); required unless bound to loopback"
    )
    parser.add_argument("--state-dir", help="job store directory (default: AVATAR_RENDER_STATE_DIR)")
    parser.add_argument(
        "--output-root",
        action="append",
        dest="output_roots",
        metavar="URI",
        help="allowed output root (repeat); default: <state dir>/outputs",
    )
    parser.add_argument("--uvicorn", action="store_true", help="serve with uvicorn in this process, without Ray Serve")
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict:
    values = {
        "host": args.host,
        "port": args.port,
        "auth_token": args.token,
        "state_dir": args.state_dir,
        "output_roots": args.output_roots,
    }
    return {name: value for name, value in values.items() if value is not None}


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deploy.settings import ServiceSettings
    from pipeline.uri import normalize_uri

    overrides = _overrides(args)
    try:
        settings = ServiceSettings(**overrides)  # refuses a non-loopback host without a token, here and now
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise SystemExit(f"avatar-render serve: {problems}") from None
    # A Serve replica's working directory is not ours: hand it absolute paths.
    overrides["state_dir"] = str(settings.state_dir.resolve())
    if settings.output_roots:
        overrides["output_roots"] = [normalize_uri(root) for root in settings.output_roots]
    if args.uvicorn:
        from deploy.app import create_app
        from deploy.store import StateDirLocked

        try:
            app = create_app(settings)  # takes the state dir's lock: a second service on it stops here
        except StateDirLocked as err:
            raise SystemExit(f"avatar-render serve: {err}") from None
        print(f"avatar-render service on http://{settings.host}:{settings.port} (uvicorn); Ctrl-C stops it", flush=True)
        connect_ray(settings.pipeline)
        run_uvicorn(app, settings.host, settings.port)
        return 0
    return _run_serve(settings, overrides)


def _run_serve(settings, overrides: dict) -> int:
    import signal
    import threading

    from ray import serve

    from deploy.serve_app import build

    connect_ray(settings.pipeline)  # the replica runs jobs on the cluster the pipeline would use
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(overrides), name="avatar-render", route_prefix="/")
    print(f"avatar-render service on http://{settings.host}:{settings.port} (Ray Serve); Ctrl-C stops it", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()  # the replica's lifespan stops its job workers; unfinished jobs stay queued
    import ray

    ray.shutdown()
    return 0


def connect_ray(pipeline_settings) -> None:
    """Join RAY_ADDRESS / the configured cluster, or start a local Ray, from the main thread and before
    the signal handlers are set (Ray installs its own SIGTERM handler when it starts)."""
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=pipeline_settings.ray_address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)


def run_uvicorn(app, host: str, port: int, **config) -> None:
    """Serve `app` with uvicorn until SIGINT/SIGTERM, then stop the job workers and the Ray connection.

    uvicorn runs in a thread because, in the main thread, it re-raises the signal after its shutdown, which
    kills the process before Ray's own shutdown and leaves Ray's agent processes behind. Call connect_ray
    first, so that these handlers replace Ray's.
    """
    import signal
    import sys
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **{"log_level": "info", **config}))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(0.5):
        pass
    server.should_exit = True  # runs the app's shutdown: running jobs stop at their next block, stay queued
    thread.join()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
