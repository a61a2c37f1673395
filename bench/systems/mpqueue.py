"""``multiprocessing.Queue``: what the standard library offers out of the box.

The payload (a ``bytearray``) is put on one queue; the consumer acks on a second queue.
``put`` returns before the feeder thread pickled the payload, so the harness gives this
system one payload buffer per message in flight.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from bench.harness import Config, PayloadRing
from bench.systems.base import System


class MpQueue(System):
    name = "mp-queue"
    transport = "pipe"
    description = "multiprocessing.Queue (pickled bytearray; acks on a second queue)"
    deferred = True

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        super().__init__(cfg, ring)
        ctx = multiprocessing.get_context("spawn")
        self.q: Any = ctx.Queue()
        self.acks: Any = ctx.Queue()
        self.timeout = cfg.timeout

    def listen(self) -> Any:
        return self.q, self.acks

    def send(self, i: int) -> None:
        self.q.put(self.ring.frames[i])

    def wait_ack(self) -> int:
        # a timeout, so that a dead consumer is an error and not a hang
        self.acks.get(timeout=self.timeout)
        return 1

    def close(self) -> None:
        if self.q is None:
            return
        try:
            self.q.put(None)
        finally:
            for q in (self.q, self.acks):
                q.cancel_join_thread()
                q.close()
            self.q = self.acks = None

    class Receiver(System.Receiver):
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            self.q, self.acks = endpoint

        def receive(self) -> Any:
            obj = self.q.get()
            return None if obj is None else memoryview(obj)

        def ack(self) -> None:
            self.acks.put(b"\x01")

        def close(self) -> None:
            self.acks.close()
            self.acks.join_thread()
