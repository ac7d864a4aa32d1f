"""The ``dotattn`` command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dotattn.cli import bench, check, demo, diagnose, engines, explain


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dotattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(commands)
    engines.add_parser(commands)
    check.add_parser(commands)
    bench.add_parser(commands)
    explain.add_parser(commands)
    diagnose.add_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)
