"""A module that already has its own asyncio loop, reading frames from fastshm-writer.

The frames arrive through the loop's readiness callbacks, beside whatever else the
module does (here, a heartbeat); no thread is started for them. Run it next to a
writer on the same route:

    FASTSHM_URL=unix:///tmp/fastshm.sock fastshm-writer &
    FASTSHM_URL=unix:///tmp/fastshm.sock python own_loop.py

It stops on SIGTERM or SIGINT, after FASTSHM_COUNT frames when that is set, or when
the writer closes its route.
"""

from __future__ import annotations

import asyncio
import os
import signal
import zlib

import fastshm


async def heartbeat(every: float = 5.0) -> None:
    """Stands for the module's own work: it keeps running while frames come in."""
    while True:
        await asyncio.sleep(every)
        print("still here", flush=True)


async def main() -> int:
    url = os.environ.get("FASTSHM_URL", "tcp://127.0.0.1:5555")
    count = int(os.environ.get("FASTSHM_COUNT", "0"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    beat = asyncio.ensure_future(heartbeat())
    received = 0
    try:
        async with fastshm.AsyncSubscriber(url, connect_timeout=30) as sub:
            while not stop.is_set():
                msg = await sub.receive(timeout=0.5)  # None when nothing came: look at `stop`
                if msg is None:
                    continue
                with msg:  # the slot goes back to the writer when the block ends
                    crc = zlib.crc32(msg)  # reads the frame in place, no copy
                print(f"frame {msg.seq}: {msg.nbytes} bytes, crc32 {crc:08x}", flush=True)
                received += 1
                if count and received >= count:
                    break
    except fastshm.Disconnected as exc:
        print(f"writer gone: {exc}", flush=True)
    finally:
        beat.cancel()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
