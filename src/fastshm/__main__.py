"""The ``fastshm`` command line (also ``python -m fastshm``).

Subcommands
-----------
demo
    A writer and a reader process exchange frames; a summary is printed.
ls
    List fastshm segments in /dev/shm: size, owner, live or dead.
gc
    Remove the segments whose creator is dead.
bridge
    Carry fastshm channels between hosts through Eclipse Zenoh (``export``, ``import``).
bench
    Run the benchmark suite (``bench/``): medians, ratios to the baselines, a chart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from fastshm import admin, bench, demo

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

    p = sub.add_parser("ls", help="list fastshm segments in /dev/shm, live and dead")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=_ls)

    p = sub.add_parser("gc", help="remove segments whose creator is dead")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--min-age", type=float, default=2.0,
                   help="spare segments younger than this many seconds (default 2)")
    p.add_argument("--prefix", default=admin.PREFIX,
                   help="only names starting with this (default 'fastshm.')")
    p.set_defaults(run=_gc)

    p = sub.add_parser("bridge", help="span hosts: fastshm channels to and from Eclipse Zenoh")
    p.set_defaults(run=_bridge)
    _bridge_arguments(p)

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


def _bridge_arguments(parser: argparse.ArgumentParser) -> None:
    from fastshm import bridge  # Zenoh itself is imported only when a bridge runs

    bridge.add_arguments(parser)


def _bridge(args: argparse.Namespace) -> int:
    from fastshm import bridge

    return bridge.run(args)


def _ls(args: argparse.Namespace) -> int:
    reports = admin.list_segments()
    if args.json:
        for r in reports:
            print(json.dumps(r.as_dict()))
        return 0
    if not reports:
        print("no fastshm segments in /dev/shm")
        return 0
    print(f"{'NAME':44} {'SIZE':>12} {'UID':>6} {'MODE':>5} {'OWNER':>8} {'SLOTS':>12}  STATE")
    for r in reports:
        state = {True: "live", False: "dead", None: "unknown"}[r.alive]
        slots = f"{r.slots}x{r.slot_size}" if r.slots else "-"
        owner = str(r.pid) if r.pid else "-"
        print(f"{r.name:44} {r.size:>12} {r.uid:>6} {r.mode:>5o} {owner:>8} {slots:>12}  {state}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    removed = admin.reap(prefix=args.prefix, min_age=args.min_age, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for name in removed:
        print(f"{verb} {name}")
    print(f"{verb} {len(removed)} segment(s) of dead owners")
    return 0


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
