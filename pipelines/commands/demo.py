"""`reverie demo`: the whole loop on this machine, one command: a day, a night, a federated round."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="a day and a night of Reverie on this machine, with a report",
        description="Pretrains a model briefly (once; kept in <data root>/demo/pretrained/), serves it with "
                    "Ray Serve on a local Ray, lets simulated users teach it facts over HTTP for a 'day' "
                    "(fast memory, Parquet experience log), runs the nightly sleep through the Prefect flow, "
                    "checks that the promoted version is served, runs a federated round with simulated "
                    "devices (Flower), and prints a report: recall with fast memory wiped before and after "
                    "the sleep, bits-per-byte drift, bytes uploaded per device, versions, time per phase. "
                    "The report is also saved as <data root>/demo/report.json and report.png. Each run "
                    "starts from a fresh <data root>/demo/store/. About 1.5 minutes on 2 idle CPU cores with the "
                    "tiny preset, longer when they are busy. Runs on this machine: RAY_ADDRESS is ignored.")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"),
                        help="demo size: tiny (2 CPU cores, minutes; measured) or small (a bigger model, more "
                             "users and devices, for a GPU machine; its sleep recipe is not tuned yet)")
    parser.add_argument("--users", type=int, help="simulated users (default: the preset's)")
    parser.add_argument("--pretrain-steps", type=int, help="pretraining steps when no checkpoint is kept yet")
    parser.add_argument("--sleep-steps", type=int, help="sleep steps per user (default: the preset's recipe)")
    parser.add_argument("--clients", type=int, help="simulated devices in the federated round")
    parser.add_argument("--port", type=int, help="HTTP port of the Serve app (default 8000)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: the preset's)")
    parser.add_argument("--seed", type=int, help="facts and initial weights (default 0)")
    parser.set_defaults(run=run)


def _config(args: argparse.Namespace):
    from pipelines.demo import DEMO_PRESETS  # noqa: PLC0415

    config = DEMO_PRESETS[args.preset]
    overrides = {"users": args.users, "pretrain_steps": args.pretrain_steps, "clients": args.clients,
                 "port": args.port, "num_cpus": args.num_cpus, "seed": args.seed}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.sleep_steps is not None:
        config = dataclasses.replace(config, sleep={**config.sleep, "steps": args.sleep_steps})
    return config


def run(args: argparse.Namespace) -> int:
    # As `reverie sleep`: the ephemeral Prefect server may need more than 20 s to start on a busy
    # small machine; a user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if os.environ.pop("RAY_ADDRESS", None):
        log.warning("the demo starts its own local Ray; ignoring RAY_ADDRESS")
    from pipelines.demo import run_demo  # noqa: PLC0415 - Ray, Prefect and Flower load slowly
    from pipelines.demo_report import table  # noqa: PLC0415
    from pipelines.settings import Settings  # noqa: PLC0415

    report = run_demo(_config(args), Settings.load(args.config))
    print(table(report))
    print(f"report: {report['files']['json']}, {report['files']['png']}")
    return 0 if report["gate"]["passed"] else 1
