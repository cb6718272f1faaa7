"""``osfn-dist`` command line: train | serve | status | bench.

Each subcommand lives beside the code it drives and registers itself here through a
``register(subparsers)`` function, so this file stays a thin dispatcher.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, purpose) — each module defines register(subparsers) that adds its subcommand(s)
# and sets ``func`` on the parser.
COMMAND_MODULES = (
    "osfn_dist.train.command",
    "osfn_dist.service.command",
    "osfn_dist.bench.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osfn-dist",
        description="Online saddle-free Newton training: train, serve the curvature service, inspect, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an optional extra is not installed
            if exc.name and exc.name.startswith("osfn_dist"):
                continue
            missing = exc.name
            stub = sub.add_parser(name.split(".")[-2], help=f"(needs the package {missing!r})")
            stub.set_defaults(func=lambda args, m=missing: sys.exit(
                f"osfn-dist: this command needs {m!r}; install it with pip install 'osfn-dist[all]'"))
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
