"""A subscriber process for the handshake tests: ``python tests/remote_peer.py URL [options]``.

It may run where the publisher's memory is out of reach (a private /dev/shm, a
network namespace).  It prints one JSON line: messages received, how many had
wrong bytes, how many came inline, the transport chosen, or the error raised.
"""

from __future__ import annotations

import argparse
import json

from fastshm import Disconnected, Subscriber
from fastshm._core import buffers_equal
from fastshm.demo import expected_frame, pattern


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--secret", default=None)
    p.add_argument("--transport", default="auto")
    p.add_argument("--timeout", type=float, default=30)
    args = p.parse_args()
    base = pattern(args.size)
    got = bad = inline = 0
    out: dict = {}
    try:
        with Subscriber(args.url, connect_timeout=30, secret=args.secret,
                        transport=args.transport) as sub:
            sub.wait_ready(args.timeout)
            out["transport"] = sub.transport
            print(json.dumps({"ready": sub.transport}), flush=True)
            while got < args.count:
                msg = sub.receive(timeout=args.timeout)
                if msg is None:
                    break
                with msg:
                    if msg.nbytes != args.size or not buffers_equal(
                            msg, expected_frame(base, msg.seq, args.size)):
                        bad += 1
                    inline += msg.inline
                got += 1
    except Disconnected:
        pass
    except Exception as exc:  # reported to the test, which checks it
        out["error"] = f"{type(exc).__name__}: {exc}"
    out.update(received=got, bad=bad, inline=inline)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
