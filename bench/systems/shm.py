"""``multiprocessing.shared_memory`` with a hand-written descriptor over TCP.

What a careful engineer would write without fastshm: one segment of ``window`` slots created
once (64-byte aligned slots, reused round-robin: a slot is written again only after its
message was acked, so nothing is overwritten while the reader may see it); the payload is
copied into the slot with one memoryview assignment (a ``memcpy``); a 16-byte ``struct``
descriptor (slot, length, sequence) packed into a preallocated buffer goes over a
``TCP_NODELAY`` socket; the reader parses descriptors read in batches with ``recv_into`` and
hands out a memoryview of the slot made once at start.
"""

from __future__ import annotations

import struct
from multiprocessing import shared_memory
from typing import Any

from bench.harness import RESOURCES, Config, PayloadRing
from bench.systems.base import System, accept_stream, close_listener, connect_stream, listen_stream

DESC = struct.Struct("<IIQ")  # slot, length, sequence
ACK = b"\x01"


def _slot_size(size: int) -> int:
    return (size + 63) & ~63


class ShmDescriptor(System):
    name = "mp-shm"
    transport = "tcp"
    description = "multiprocessing.shared_memory + 16-byte struct descriptor over TCP"

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        super().__init__(cfg, ring)
        self.slots = cfg.window
        step = _slot_size(cfg.size)
        self.shm = shared_memory.SharedMemory(create=True, size=step * self.slots)
        RESOURCES.shm_names.add(self.shm.name)
        self.slot_views = [self.shm.buf[k * step : k * step + cfg.size] for k in range(self.slots)]
        self.desc = bytearray(DESC.size)
        self.count = 0
        self.lsock: Any = None
        self.sock: Any = None
        self.endpoint: Any = None
        self.ackbuf = bytearray(4096)

    def listen(self) -> Any:
        self.lsock, self.endpoint = listen_stream("tcp", self.name)
        return self.endpoint, self.shm.name, self.slots

    def accept(self, proc: Any, timeout: float) -> None:
        self.sock = accept_stream(self.lsock, proc, timeout)
        close_listener(self.lsock, self.endpoint)
        self.lsock = None
        self._sendall = self.sock.sendall
        self._recv_into = self.sock.recv_into

    def send(self, i: int) -> None:
        count = self.count
        slot = count % self.slots
        self.slot_views[slot][:] = self.ring.views[i]
        DESC.pack_into(self.desc, 0, slot, self.ring.size, count)
        self._sendall(self.desc)
        self.count = count + 1

    def wait_ack(self) -> int:
        n = self._recv_into(self.ackbuf)
        if n == 0:
            raise ConnectionError("consumer closed the connection")
        return n

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        close_listener(self.lsock, self.endpoint)
        self.lsock = None
        for v in self.slot_views:
            v.release()
        self.slot_views = []
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            RESOURCES.shm_names.discard(self.shm.name)
            self.shm = None

    class Receiver(System.Receiver):
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            route, name, slots = endpoint
            # attaching registers the name with the resource tracker shared with the
            # parent (spawn context); it stays the creator's to unlink
            self.shm = shared_memory.SharedMemory(name=name)
            step = _slot_size(cfg.size)
            self.size = cfg.size
            self.views = [self.shm.buf[k * step : k * step + cfg.size] for k in range(slots)]
            self.sock = connect_stream(route)
            self._send = self.sock.send
            self.buf = bytearray(DESC.size * 256)
            self.mv = memoryview(self.buf)
            self.pos = 0
            self.end = 0

        def receive(self) -> Any:
            if self.end - self.pos < DESC.size:
                left = self.end - self.pos
                if left:
                    self.mv[:left] = self.mv[self.pos : self.end]
                self.pos, self.end = 0, left
                while self.end < DESC.size:
                    n = self.sock.recv_into(self.mv[self.end :])
                    if n == 0:
                        return None
                    self.end += n
            slot, length, _seq = DESC.unpack_from(self.buf, self.pos)
            self.pos += DESC.size
            view = self.views[slot]
            return view if length == self.size else view[:length]

        def ack(self) -> None:
            self._send(ACK)

        def close(self) -> None:
            self.sock.close()
            for v in self.views:
                v.release()
            self.shm.close()
