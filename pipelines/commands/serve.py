"""`reverie serve`: run the online serving application (Ray Serve) with the embedded defaults.

The same application as `serve run infra/serve.yaml`; flags override its defaults.
"""

from __future__ import annotations

import argparse

from pipelines.ports import check_port_free
from pipelines.settings import Settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the model over HTTP (Ray Serve) with per-user fast memory",
        description="Starts (or joins, with RAY_ADDRESS) Ray, deploys the Reverie serving app and "
                    "serves POST /v1/generate, POST /v1/reset, GET /v1/users/{id} and GET /healthz "
                    "until Ctrl-C. Weights: the checkpoint registry's current version under the data "
                    "root; an empty registry gets <data root>/train/<preset>.safetensors or a fresh model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of a locally started Ray (default 2)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--preset", help="model for an empty registry (default: settings)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workers.serving import serve_forever

    settings = Settings.load(args.config)
    if not settings.ray_address:  # a cluster's proxies bind on its nodes, not here
        check_port_free(args.host, args.port)
    app_args = {"data_root": settings.storage.root, "preset": args.preset or settings.preset,
                "num_replicas": args.replicas, "max_batch_size": args.max_batch_size}
    serve_forever(app_args, args.host, args.port, settings.ray_address, args.num_cpus)
    return 0
