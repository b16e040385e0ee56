"""The `reverie` command. Each subcommand lives in `pipelines/commands/<name>.py` with a
`register(subparsers)` function, so adding one never touches the others."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("train", "generate", "serve", "sleep", "search", "federate", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reverie",
        description="Reverie: a byte-level LM that learns online through fast memory by day and "
                    "consolidates it into weights by night. Settings come from flags, REVERIE_* "
                    "environment variables and reverie.toml, in that order.")
    parser.add_argument("--config", help="settings file (default: ./reverie.toml or $REVERIE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipelines.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"reverie {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
