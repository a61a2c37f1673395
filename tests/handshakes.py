"""Finish handshakes between a publisher and subscribers living in the same thread.

The handshake takes several round trips (HELLO, AUTH, PROBE), and each side
only moves when it is called: ``pub.wait_for_subscribers()`` alone would wait
for subscribers that nobody drives.  This drives both.
"""

from __future__ import annotations

import time


def connect(pub, *subs, total: int = 0, timeout: float = 5.0) -> None:
    """Serve ``pub`` and each subscriber until all are ready (and ``total`` connected)."""
    total = max(total, len(subs))
    deadline = time.monotonic() + timeout
    while True:
        pub.poll(0.002)
        pending = [s for s in subs if not s.ready]
        for sub in pending:
            try:
                sub.wait_ready(0.002)
            except TimeoutError:
                pass
        if not pending and pub.subscribers >= total:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pub.subscribers} of {total} subscribers connected")
