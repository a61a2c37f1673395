"""Writer and reader processes for the two-host bridge tests.

``python tests/bridge_peer.py writer URL --size N --rate FPS`` publishes frame
``n`` (``fastshm.demo.expected_frame``) with ``n`` in its metadata until
SIGTERM.  ``python tests/bridge_peer.py reader URL --size N`` reads, checks
every byte of every frame against the source sequence in its metadata,
reconnects whenever the route goes away, prints ``{"frames": total,
"connections": k}`` every 10 frames and a summary line on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import time

from fastshm import Disconnected, Publisher, Subscriber
from fastshm._core import buffers_equal
from fastshm.demo import expected_frame, pattern

stop = False


def _stop(*_: object) -> None:
    global stop
    stop = True


def writer(args: argparse.Namespace) -> dict:
    base = pattern(args.size)
    sent = 0
    with Publisher(args.url, slot_size=args.size, slots=4) as pub:
        print(json.dumps({"url": pub.url}), flush=True)
        n = 0
        while not stop:
            n += 1
            pub.send(expected_frame(base, n, args.size), timeout=10, meta=struct.pack("<Q", n))
            sent += 1
            pub.poll(1 / args.rate)
    return {"sent": sent}


def reader(args: argparse.Namespace) -> dict:
    base = pattern(args.size)
    frames = bad = connections = 0
    while not stop:
        try:
            sub = Subscriber(args.url, connect_timeout=0.5)
        except OSError:
            time.sleep(0.1)
            continue
        with sub:
            counted = False
            try:
                while not stop:
                    msg = sub.receive(timeout=0.2)
                    if msg is None:
                        if sub.closed:
                            break
                        continue
                    with msg:
                        (n,) = struct.unpack("<Q", msg.meta)
                        if msg.nbytes != args.size or not buffers_equal(
                                msg, expected_frame(base, n, args.size)):
                            bad += 1
                    if not counted:
                        connections, counted = connections + 1, True
                    frames += 1
                    if frames % 10 == 0:
                        print(json.dumps({"frames": frames, "connections": connections,
                                          "bad": bad}), flush=True)
            except (Disconnected, OSError):
                pass
    return {"frames": frames, "connections": connections, "bad": bad}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("writer", "reader"))
    p.add_argument("url")
    p.add_argument("--size", type=int, default=1920 * 1080 * 3)
    p.add_argument("--rate", type=float, default=30.0)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    report = writer(args) if args.role == "writer" else reader(args)
    print(json.dumps({"done": True, **report}), flush=True)


if __name__ == "__main__":
    main()
