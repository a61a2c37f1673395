"""The ``fastshm`` command line (also ``python -m fastshm``).

Subcommands
-----------
demo
    A writer and a reader process exchange frames; a summary is printed.
bench
    Run the benchmark suite (``bench/``): medians, ratios to the baselines, a chart.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from fastshm import bench, demo

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastshm`` command."""
    parser = argparse.ArgumentParser(
        prog="fastshm", description="Shared-memory transport: tools and demo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="stream frames from a writer process to a reader process")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run_demo)

    p = sub.add_parser("bench", help="run the benchmark suite: medians, ratios and a chart")
    bench.add_arguments(p)
    p.set_defaults(run=bench.run)

    # The demo's two processes (started by `demo`, not meant to be typed).
    p = sub.add_parser("demo-writer")
    demo.add_arguments(p, role=True)
    p.set_defaults(run=demo.writer_main)
    p = sub.add_parser("demo-reader")
    demo.add_arguments(p, role=True)
    p.set_defaults(run=demo.reader_main)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fastshm`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
