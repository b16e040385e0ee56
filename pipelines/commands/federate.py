"""`reverie federate`: run federated personalization rounds (Flower) and register the aggregate."""

from __future__ import annotations

import argparse
import json
import tomllib

from pipelines.settings import Settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "federate", help="run federated rounds with Flower and store the aggregate for the next sleep",
        description="Runs the Prefect flow `federate`: submits the Flower app (federation/) with `flwr run`, "
                    "waits for its rounds, and registers the robust aggregate of the devices' BitDeltas in the "
                    "delta store under the promoted checkpoint's version. Without --connection it uses "
                    "Flower's local simulation with --clients virtual devices; with one it submits to that "
                    "SuperLink (see docs/federation.md).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2, help="simulated devices (local simulation only)")
    parser.add_argument("--aggregation", default="clipped-mean", choices=("clipped-mean", "trimmed-mean", "sign-vote"))
    parser.add_argument("--connection",
                        help="SuperLink connection in $FLWR_HOME/config.toml (default: local simulation)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any [tool.flwr.app.config] key, TOML value, e.g. --set dp-noise-multiplier=1.0 "
                             "--set attackers='\"3:flip\"' (repeatable)")
    parser.add_argument("--name", help="aggregate name; a re-run with the same name returns the stored result")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    parser.set_defaults(run=run)


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r} must look like key=value")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value  # a bare string
    return overrides


def run(args: argparse.Namespace) -> int:
    from pipelines.federate import federate

    settings = Settings.load(args.config)
    result = federate(rounds=args.rounds, clients=args.clients, aggregation=args.aggregation,
                      connection=args.connection, data=settings.storage.root, run_config=_overrides(args.set),
                      name=args.name, timeout_s=args.timeout)
    rounds = result.pop("rounds", [])
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2, default=str))
    for r in rounds:
        print(f"round {r['server_round']}: {len(r['accepted'])} accepted, {len(r['rejected'])} rejected, "
              f"{len(r['bounded'])} bounded, held-out bpb {r['heldout_bpb']}")
    return 0
