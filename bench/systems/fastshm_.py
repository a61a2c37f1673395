"""fastshm itself, through its public API (Publisher / Subscriber / Message).

``send``: the payload is copied into a slot of the publisher's segment (one copy) and only
its address travels over the route. ``loan``: the producer writes into the slot in place, so
nothing is copied at all; the benchmark writes only the two stamped bytes there (every slot
holds the payload pattern from the start), which measures what the transport costs when the
producer makes its data in the slot. The subscriber reads the slot in place and releases it.
Streaming sends a window's worth of messages inside ``Publisher.batch()``.

fastshm has no reply path of its own, so the 1-byte ack goes back on a plain socket of the
same transport, exactly as the socket baselines send theirs on their connection.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from bench.harness import RESOURCES, Config, PayloadRing
from bench.systems.base import System, accept_stream, close_listener, connect_stream, listen_stream

try:
    import fastshm
except ImportError as exc:  # not built or not installed
    fastshm = None
    _IMPORT_ERROR = str(exc)

ACK = b"\x01"
#: segments of this process are named ``fastshm.<CHANNEL>.<random>``
CHANNEL = f"bench{os.getpid()}"
RESOURCES.shm_prefixes.add(f"fastshm.{CHANNEL}.")


class FastShm(System):
    role = "fastshm"

    @classmethod
    def unavailable(cls) -> str | None:
        if fastshm is None:
            return f"fastshm is not importable ({_IMPORT_ERROR}); pip install -e ."
        return None

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        super().__init__(cfg, ring)
        if self.transport == "tcp":
            url = "tcp://127.0.0.1:0"
        else:
            path = os.path.join(RESOURCES.workdir(), f"fastshm-{os.getpid()}-{id(self)}.sock")
            RESOURCES.paths.add(path)
            url = "unix://" + path
        # latency: the default 8 slots (most-recently-freed reuse keeps one hot);
        # streaming: one slot per message the harness lets be in flight
        self.slots = slots = max(8, cfg.window)
        self.pub = fastshm.Publisher(url, slot_size=cfg.size, slots=slots, channel=CHANNEL,
                                     send_timeout=cfg.timeout)
        self.lsock: Any = None
        self.ack_endpoint: Any = None
        self.sock: Any = None
        self.ackbuf = bytearray(4096)

    def listen(self) -> Any:
        self.lsock, self.ack_endpoint = listen_stream(self.transport, self.name + "-ack")
        return self.pub.url, self.ack_endpoint

    def accept(self, proc: Any, timeout: float) -> None:
        self.sock = accept_stream(self.lsock, proc, timeout)
        close_listener(self.lsock, self.ack_endpoint)
        self.lsock = None
        self.pub.wait_for_subscribers(1, timeout=timeout)
        self._pub_send = self.pub.send
        self._views = self.ring.views
        self._recv_into = self.sock.recv_into

    def send(self, i: int) -> None:
        if not self._pub_send(self._views[i]):
            raise ConnectionError("the subscriber is gone")

    def batch(self) -> Any:
        # streaming: the addresses of a window's worth of messages in one syscall
        return self.pub.batch()

    def wait_ack(self) -> int:
        n = self._recv_into(self.ackbuf)
        if n == 0:
            raise ConnectionError("consumer closed the connection")
        return n

    def close(self) -> None:
        try:
            self.pub.close()
        finally:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            close_listener(self.lsock, self.ack_endpoint)
            self.lsock = None

    class Receiver(System.Receiver):
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            url, ack_endpoint = endpoint
            self.sub = fastshm.Subscriber(url, connect_timeout=cfg.timeout)
            self.sock = connect_stream(ack_endpoint)
            self._send = self.sock.send
            self._receive = self.sub.receive
            self.msg: Any = None
            self.view: Any = None

        def receive(self) -> Any:
            try:
                msg = self._receive()
            except fastshm.Disconnected as exc:
                self.end = f"Disconnected: {exc}"
                return None
            self.msg = msg
            self.view = memoryview(msg)
            return self.view

        def done(self) -> None:
            self.view.release()
            self.msg.release()

        def ack(self) -> None:
            self._send(ACK)

        def close(self) -> None:
            self.sock.close()
            self.sub.close()


class FastShmTcp(FastShm):
    name = "fastshm-tcp"
    transport = "tcp"
    description = "fastshm Publisher.send / Subscriber.receive over tcp://"


class FastShmUnix(FastShm):
    name = "fastshm-unix"
    transport = "unix"
    description = "fastshm Publisher.send / Subscriber.receive over unix://"


class FastShmLoan(FastShm):
    """``Publisher.loan``: the payload is made in the slot; nothing is copied."""

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        super().__init__(cfg, ring)
        # fill every slot with the payload pattern once, before any subscriber is there
        # (a loan published to nobody is discarded: its bytes stay in the slot)
        base = ring.views[0]
        with contextlib.ExitStack() as stack:
            for _ in range(self.slots):
                buf = stack.enter_context(self.pub.loan(cfg.size))
                buf[:] = base
        self.last = cfg.size - 1

    def accept(self, proc: Any, timeout: float) -> None:
        super().accept(proc, timeout)
        self._loan = self.pub.loan

    def send(self, i: int) -> None:
        view = self._views[i]
        last = self.last
        with self._loan(self.ring.size) as buf:
            buf[0] = view[0]
            buf[last] = view[last]


class FastShmLoanTcp(FastShmLoan):
    name = "fastshm-loan-tcp"
    transport = "tcp"
    description = "fastshm Publisher.loan (payload made in the slot) over tcp://"


class FastShmLoanUnix(FastShmLoan):
    name = "fastshm-loan-unix"
    transport = "unix"
    description = "fastshm Publisher.loan (payload made in the slot) over unix://"
