"""Raw stream sockets carrying the payload: the baseline fastshm must beat.

Done as a careful engineer would: ``TCP_NODELAY``; one ``sendall`` per message of a frame
built in place (8-byte length header in the ring's headroom, so no per-message allocation or
gather list); the reader ``recv_into`` a preallocated buffer, reading greedily (several small
frames per syscall) and finishing a large frame with one ``MSG_WAITALL`` call; acks are read
in batches with ``recv_into``.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from bench.harness import Config, PayloadRing
from bench.systems.base import System, accept_stream, close_listener, connect_stream, listen_stream

HEADER = struct.Struct("<Q")
GREEDY = 64 * 1024
ACK = b"\x01"


class FrameReader:
    """Length-prefixed frames from a stream socket into one preallocated buffer.

    The view returned by :meth:`next` stays valid until the next call.
    """

    def __init__(self, sock: socket.socket, max_payload: int) -> None:
        self.sock = sock
        self.cap = max(HEADER.size + max_payload, 2 * GREEDY)
        self.buf = bytearray(self.cap)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _compact(self) -> None:
        n = self.end - self.start
        if n:
            self.mv[:n] = self.mv[self.start : self.end]
        self.start, self.end = 0, n

    def next(self) -> memoryview | None:
        mv, recv_into = self.mv, self.sock.recv_into
        if self.start == self.end:
            self.start = self.end = 0
        if self.end - self.start < HEADER.size:
            if self.cap - self.start < GREEDY:
                self._compact()
            while self.end - self.start < HEADER.size:
                n = recv_into(mv[self.end : self.end + GREEDY])
                if n == 0:
                    if self.end == self.start:
                        return None
                    raise ConnectionError("stream ended inside a frame header")
                self.end += n
        (length,) = HEADER.unpack_from(self.buf, self.start)
        need = self.start + HEADER.size + length
        if need > self.cap:
            self._compact()
            need = HEADER.size + length
            if need > self.cap:
                raise ValueError(f"frame of {length} bytes is larger than the buffer")
        while self.end < need:
            n = recv_into(mv[self.end : need], need - self.end, socket.MSG_WAITALL)
            if n == 0:
                raise ConnectionError("stream ended inside a frame")
            self.end += n
        view = mv[self.start + HEADER.size : need]
        self.start = need
        return view


class RawSocket(System):
    """Base of the raw-socket systems."""

    role = "baseline"
    headroom = HEADER.size

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        super().__init__(cfg, ring)
        self.lsock: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.endpoint: Any = None
        self.ackbuf = bytearray(4096)
        if self.headroom:
            for frame in ring.frames:
                HEADER.pack_into(frame, 0, ring.size)
        self.frames = ring.frames

    def listen(self) -> Any:
        self.lsock, self.endpoint = listen_stream(self.transport, self.name)
        return self.endpoint

    def accept(self, proc: Any, timeout: float) -> None:
        assert self.lsock is not None
        self.sock = accept_stream(self.lsock, proc, timeout)
        self._sendall = self.sock.sendall
        self._recv_into = self.sock.recv_into
        close_listener(self.lsock, self.endpoint)
        self.lsock = None

    def send(self, i: int) -> None:
        # the header was packed at setup: every message has the same length here, and
        # packing it per message would cost one pack_into (~0.1 us) more
        self._sendall(self.frames[i])

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

    class Receiver(System.Receiver):
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            self.sock = connect_stream(endpoint)
            self.reader = FrameReader(self.sock, cfg.size)
            self.receive = self.reader.next  # type: ignore[method-assign]
            self._send = self.sock.send

        def ack(self) -> None:
            self._send(ACK)

        def close(self) -> None:
            self.sock.close()


class TcpSocket(RawSocket):
    name = "tcp"
    transport = "tcp"
    description = "raw TCP socket carrying the payload (sendall / recv_into)"


class UnixSocket(RawSocket):
    name = "unix"
    transport = "unix"
    description = "raw Unix stream socket carrying the payload (sendall / recv_into)"


class BareSocket(RawSocket):
    """The limit of a socket hop: fixed 64-byte messages, no header, exact reads."""

    role = "limit"
    headroom = 0
    sizes = (64,)
    kinds = ("latency",)
    modes = ("touch",)

    def send(self, i: int) -> None:
        self._sendall(self.frames[i])

    class Receiver(RawSocket.Receiver):
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            self.sock = connect_stream(endpoint)
            self._send = self.sock.send
            self.size = cfg.size
            self.buf = bytearray(cfg.size)
            self.mv = memoryview(self.buf)

        def receive(self) -> memoryview | None:  # type: ignore[override]
            got = self.sock.recv_into(self.mv, self.size)
            if got == 0:
                return None
            while got < self.size:
                n = self.sock.recv_into(self.mv[got:], self.size - got)
                if n == 0:
                    raise ConnectionError("stream ended inside a message")
                got += n
            return self.mv


class BareTcp(BareSocket):
    name = "bare-tcp"
    transport = "tcp"
    description = "limit: bare 64-byte TCP ping-pong (no header)"


class BareUnix(BareSocket):
    name = "bare-unix"
    transport = "unix"
    description = "limit: bare 64-byte Unix-socket ping-pong (no header)"
