"""The plug-in interface every benchmarked system implements.

A system moves a payload from the producer (the benchmark process) to the consumer (a child
process) and carries a 1-byte ack back. The harness owns the loops, the timing, the payload
and the checks; a system only implements the primitives below, so a new system is one class
(see ``sockets.py`` for the simplest one). Register it in ``bench/systems/__init__.py``.

Producer side (in the benchmark process)::

    system = Cls(cfg, ring)         # cfg: harness.Config, ring: harness.PayloadRing
    endpoint = system.listen()      # bind; returns what the consumer needs (picklable)
    system.accept(proc, timeout)    # after the consumer process was started
    system.send(i)                  # send ring.views[i] (stamped by the harness)
    n = system.wait_ack()           # block until at least one ack; return how many came
    with system.batch(): ...        # optional: sends made back to back while streaming
    system.close()                  # end the stream (the consumer's receive returns None)
                                    # and free everything; must not raise

Consumer side (in the child), ``Cls.Receiver``::

    rx = Cls.Receiver(endpoint, cfg)
    view = rx.receive()             # a buffer of the next payload, or None at end of stream
    rx.done()                       # the consumer is finished with ``view``
    rx.ack()                        # send one ack byte
    rx.close()
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import socket
from typing import Any, ClassVar

from bench.harness import RESOURCES, Config, PayloadRing


_NULL = contextlib.nullcontext()


class System:
    """Base class of a benchmarked system (producer side)."""

    #: id in test names and the report, e.g. ``"tcp"``
    name: ClassVar[str] = ""
    #: what the route is: ``"tcp"``, ``"unix"`` or ``"pipe"``; targets compare like with like
    transport: ClassVar[str] = ""
    #: ``"fastshm"``, ``"baseline"`` or ``"limit"``
    role: ClassVar[str] = "baseline"
    #: one line for the report
    description: ClassVar[str] = ""
    #: True when ``send`` returns before the payload was read: the ring then holds one
    #: buffer per message in flight and a buffer is stamped again only once acked
    deferred: ClassVar[bool] = False
    #: bytes the ring keeps free in front of each payload (for a frame header)
    headroom: ClassVar[int] = 0
    #: payload sizes it takes part in (None: all)
    sizes: ClassVar[tuple[int, ...] | None] = None
    #: benchmarks it takes part in
    kinds: ClassVar[tuple[str, ...]] = ("latency", "stream")
    modes: ClassVar[tuple[str, ...]] = ("touch", "full")

    @classmethod
    def unavailable(cls) -> str | None:
        """A reason to skip this system here, or None."""
        return None

    def __init__(self, cfg: Config, ring: PayloadRing) -> None:
        self.cfg = cfg
        self.ring = ring

    def listen(self) -> Any:
        raise NotImplementedError

    def accept(self, proc: Any, timeout: float) -> None:
        pass

    def send(self, i: int) -> None:
        raise NotImplementedError

    def wait_ack(self) -> int:
        raise NotImplementedError

    def batch(self) -> Any:
        """A context manager around sends made back to back while streaming."""
        return _NULL

    def close(self) -> None:
        pass

    class Receiver:
        def __init__(self, endpoint: Any, cfg: Config) -> None:
            raise NotImplementedError

        def receive(self) -> Any:
            raise NotImplementedError

        def done(self) -> None:
            pass

        def ack(self) -> None:
            raise NotImplementedError

        def close(self) -> None:
            pass


# ------------------------------------------------------------------ socket helpers
def listen_stream(transport: str, tag: str) -> tuple[socket.socket, Any]:
    """A listening stream socket on loopback (ephemeral port) or in the harness's workdir."""
    if transport == "tcp":
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", 0))
        address: Any = lsock.getsockname()
    elif transport == "unix":
        address = os.path.join(RESOURCES.workdir(), f"{tag}-{os.getpid()}-{id(object())}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        RESOURCES.paths.add(address)
        lsock.bind(address)
    else:
        raise ValueError(transport)
    lsock.listen(1)
    return lsock, (transport, address)


def connect_stream(endpoint: tuple[str, Any]) -> socket.socket:
    transport, address = endpoint
    if transport == "tcp":
        sock = socket.create_connection(tuple(address), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(address)
    sock.settimeout(None)
    return sock


def accept_stream(lsock: socket.socket, proc: Any, timeout: float) -> socket.socket:
    """Accept the consumer's connection, or fail at once if the consumer died."""
    ready = multiprocessing.connection.wait([lsock, proc.sentinel], timeout)
    if lsock not in ready:
        if proc.sentinel in ready:
            proc.join(1.0)  # its pipe closes a moment before it can be reaped
        if not proc.is_alive():
            raise RuntimeError(f"consumer exited with {proc.exitcode} before connecting")
        raise TimeoutError("consumer did not connect")
    sock, _ = lsock.accept()
    sock.settimeout(None)
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def close_listener(lsock: socket.socket | None, endpoint: Any) -> None:
    if lsock is not None:
        lsock.close()
    if endpoint is not None and endpoint[0] == "unix":
        try:
            os.unlink(endpoint[1])
        except FileNotFoundError:
            pass
        RESOURCES.paths.discard(endpoint[1])
