"""pyzmq ``PAIR`` sockets with ``copy=False``, over tcp and ipc (optional: ``fastshm[bench]``).

Zero-copy sends hand the buffer to libzmq, which reads it later from its I/O thread, so the
harness gives this system one payload buffer per message in flight. pyzmq itself copies
messages smaller than ``zmq.COPY_THRESHOLD`` (64 KiB), because tracking them costs more than
copying. The consumer gets a ``Frame`` and reads its buffer in place; acks are read with
``recv_into`` into a preallocated buffer.
"""

from __future__ import annotations

import os
from typing import Any

from bench.harness import RESOURCES, Config, PayloadRing
from bench.systems.base import System

try:
    import zmq
except ImportError:  # optional extra
    zmq = None


class Zmq(System):
    deferred = True
    zmq_transport = ""

    @classmethod
    def unavailable(cls) -> str | None:
        if zmq is None:
            return "pyzmq is not installed (pip install 'fastshm[bench]')"
        return None

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        super().__init__(cfg, ring)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # a dead consumer turns into zmq.Again instead of a hang
        self.sock.setsockopt(zmq.RCVTIMEO, int(cfg.timeout * 1000))
        self.path: str | None = None
        self.ackbuf = bytearray(16)

    def listen(self) -> Any:
        if self.zmq_transport == "tcp":
            port = self.sock.bind_to_random_port("tcp://127.0.0.1")
            return f"tcp://127.0.0.1:{port}"
        self.path = os.path.join(RESOURCES.workdir(), f"zmq-{os.getpid()}-{id(self)}.ipc")
        RESOURCES.paths.add(self.path)
        self.sock.bind("ipc://" + self.path)
        return "ipc://" + self.path

    def send(self, i: int) -> None:
        self.sock.send(self.ring.frames[i], copy=False)

    def wait_ack(self) -> int:
        self.sock.recv_into(self.ackbuf)
        return 1

    def close(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(b"")  # end of stream
        finally:
            self.sock.close()
            self.ctx.term()
            self.sock = None
            if self.path is not None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                RESOURCES.paths.discard(self.path)

    class Receiver(System.Receiver):
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            self.ctx = zmq.Context()
            self.sock = self.ctx.socket(zmq.PAIR)
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.connect(endpoint)
            self.frame: Any = None

        def receive(self) -> Any:
            frame = self.sock.recv(copy=False)
            if len(frame) == 0:
                return None
            self.frame = frame
            return frame.buffer

        def done(self) -> None:
            self.frame = None

        def ack(self) -> None:
            self.sock.send(b"\x01")

        def close(self) -> None:
            self.sock.close()
            self.ctx.term()


class ZmqTcp(Zmq):
    name = "zmq-tcp"
    transport = "tcp"
    zmq_transport = "tcp"
    description = "pyzmq PAIR, copy=False, tcp://"


class ZmqIpc(Zmq):
    name = "zmq-ipc"
    transport = "unix"
    zmq_transport = "ipc"
    description = "pyzmq PAIR, copy=False, ipc://"
