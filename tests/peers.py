"""Publisher and subscriber processes for the multi-process tests.

Run as ``python tests/peers.py ROLE URL [options]``; each prints one JSON line
with what it did.  Frame ``n`` is ``fastshm.demo.expected_frame(base, n, size)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fastshm import Disconnected, Publisher, Subscriber
from fastshm._core import buffers_equal
from fastshm.demo import expected_frame, pattern


def subscriber(args: argparse.Namespace) -> None:
    base = pattern(args.size)
    got, bad, held = 0, 0, []
    with Subscriber(args.url, connect_timeout=30, window=args.window or None) as sub:
        sub.wait_ready(30)
        print(json.dumps({"connected": True}), flush=True)
        try:
            while args.count == 0 or got < args.count:
                msg = sub.receive(timeout=args.timeout)
                if msg is None:
                    break
                if msg.nbytes != args.size or not buffers_equal(
                        msg, expected_frame(base, msg.seq, args.size)):
                    bad += 1
                got += 1
                if args.hold and len(held) < args.hold:
                    held.append(msg)  # never released: the slot stays held
                else:
                    msg.release()
                if args.exit_after and got >= args.exit_after:
                    print(json.dumps({"received": got, "bad": bad}), flush=True)
                    sys.stdout.flush()
                    import os
                    os._exit(0)  # vanish without closing anything
        except Disconnected:
            pass
        if args.linger:
            time.sleep(args.linger)
    print(json.dumps({"received": got, "bad": bad}), flush=True)


def publisher(args: argparse.Namespace) -> None:
    base = pattern(args.size)
    with Publisher(args.url, slot_size=args.size, slots=args.slots,
                   channel=args.channel or None) as pub:
        print(json.dumps({"url": pub.url, "segment": pub.segment_name}), flush=True)
        if args.count:
            pub.wait_for_subscribers(1, timeout=30)
        for seq in range(1, args.count + 1):
            pub.send(expected_frame(base, seq, args.size), timeout=30)
        if args.linger:
            print(json.dumps({"sent": args.count}), flush=True)
            time.sleep(args.linger)  # serves nothing: a hung publisher
    print(json.dumps({"sent": args.count}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["subscriber", "publisher"])
    p.add_argument("url")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--hold", type=int, default=0)
    p.add_argument("--exit-after", type=int, default=0)
    p.add_argument("--linger", type=float, default=0)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--channel", default="")
    args = p.parse_args()
    (subscriber if args.role == "subscriber" else publisher)(args)


if __name__ == "__main__":
    main()
