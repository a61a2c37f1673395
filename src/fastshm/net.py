"""Publishers and subscribers: payloads in shared memory, addresses on a socket.

A :class:`Publisher` listens on ``tcp://host:port`` or ``unix:///path`` and owns
a pool of slots in a segment it creates.  :meth:`Publisher.send` copies a
payload into a free slot and sends its address to every subscriber.  A
:class:`Subscriber` connects, maps the segment read-only once, and turns each
address into a :class:`~fastshm.Message`: a zero-copy view of the slot.  When
the message is released its slot goes back to the publisher, batched with other
releases on the same connection.

The publisher has no thread of its own: it serves connections, handshakes and
releases whenever it is called (``send``, ``poll``, ``wait_for_subscribers``),
and :meth:`Publisher.fileno` lets an event loop call it when there is work.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from fastshm import handshake as H
from fastshm import protocol as P
from fastshm._core import FLAG_INLINE, Address, Message, PeerSegment, Segment, Stream
from fastshm.errors import AuthenticationError, Disconnected, Full, ProtocolError
from fastshm.pool import SlotPool

__all__ = ["Publisher", "Subscriber", "parse_url"]

log = logging.getLogger("fastshm")

_SEGMENT_ID = 1
_CONNECT_RETRY = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
# Serve the sockets at least this often while sending, even with free slots.
_SERVICE_INTERVAL = 0.001

Endpoint = Tuple[int, Union[str, Tuple[Any, ...]]]


def parse_url(url: str) -> Endpoint:
    """Split a route URL into a socket family and address.

    ``tcp://host:port`` (IPv6 as ``tcp://[::1]:port``; port 0 picks a free
    one), ``unix:///absolute/path`` or ``unix://@name`` (Linux abstract
    namespace).

    Raises
    ------
    ValueError
        If the URL is not one of those forms.
    """
    if url.startswith("tcp://"):
        rest = url[len("tcp://"):]
        host, sep, port_text = rest.rpartition(":")
        if not sep or not port_text.isdigit() or not host:
            raise ValueError(f"expected tcp://host:port, got {url!r}")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"port out of range in {url!r}")
        if host.startswith("[") and host.endswith("]"):
            return socket.AF_INET6, (host[1:-1], port, 0, 0)
        if host == "*":
            host = "0.0.0.0"
        return socket.AF_INET, (host, port)
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        if path.startswith("@") and len(path) > 1:
            return socket.AF_UNIX, "\0" + path[1:]
        if not path.startswith("/"):
            raise ValueError(f"expected unix:///absolute/path or unix://@name, got {url!r}")
        return socket.AF_UNIX, path
    raise ValueError(f"unsupported route {url!r}: use tcp://host:port or unix:///path")


def _format_url(family: int, address: Any) -> str:
    if family == socket.AF_UNIX:
        path = address.decode() if isinstance(address, bytes) else str(address)
        return "unix://@" + path[1:] if path.startswith("\0") else "unix://" + path
    if family == socket.AF_INET6:
        return f"tcp://[{address[0]}]:{address[1]}"
    return f"tcp://{address[0]}:{address[1]}"


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Peer:
    """The publisher's view of one subscriber connection."""

    __slots__ = ("sock", "stream", "ready", "held", "identity", "name", "sent", "window",
                 "handshake", "inline")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.stream = Stream(sock)
        self.ready = False
        self.held: Dict[int, int] = {}
        self.identity = ""
        self.name = name
        self.sent = 0
        self.window = 0
        self.handshake: Optional[H.ServerHandshake] = None
        self.inline: Optional[H.InlineQueue] = None


class Publisher:
    """Publish payloads through shared memory to subscribers on a route.

    Parameters
    ----------
    url : str
        Where to listen: ``tcp://127.0.0.1:5555``, ``tcp://127.0.0.1:0`` (a
        free port; read :attr:`url`), ``unix:///run/fastshm/cam.sock``.
    slot_size : int
        The largest payload, in bytes.
    slots : int
        How many payloads can be in flight at once (held by subscribers).
    channel : str, optional
        A name for the segment (``fastshm.<channel>.<random>``), shown by
        ``fastshm ls``.
    mode, group
        Permissions of the segment (``0o600`` by default; see
        :meth:`Segment.create`).
    send_timeout : float, optional
        Default for :meth:`send`'s ``timeout``: how long to wait for a free
        slot; ``None`` waits as long as it takes.
    secret : str or bytes, optional
        A shared secret every subscriber must prove it knows (HMAC-SHA256
        challenge-response, both ways); ``FASTSHM_SECRET`` by default.
    insecure : bool
        Allow listening on a non-loopback TCP address without a secret.
    handshake_timeout : float
        Seconds a new connection has to finish the handshake.

    Examples
    --------
    >>> with Publisher("tcp://127.0.0.1:5555", slot_size=6_220_800) as pub:
    ...     pub.wait_for_subscribers(1, timeout=10)
    ...     pub.send(frame)
    """

    def __init__(self, url: str, *, slot_size: int, slots: int = 8,
                 channel: Optional[str] = None, mode: int = 0o600,
                 group: Optional[int] = None, send_timeout: Optional[float] = None,
                 secret: H.SecretLike = None, insecure: bool = False,
                 handshake_timeout: float = H.DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        if slot_size <= 0 or slots <= 0:
            raise ValueError("slot_size and slots must be positive")
        family, address = parse_url(url)
        self._secret = H.resolve_secret(secret)
        H.check_bind(family, address, url, self._secret, insecure)
        self._handshake_timeout = float(handshake_timeout)
        self._closed = True
        self._probe: Optional[H.Probe] = None
        self._unix_path: Optional[str] = None
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif isinstance(address, str) and not address.startswith("\0"):
                _remove_stale_socket(address)
                self._unix_path = address
            listener.bind(address)
            listener.listen(64)
            listener.setblocking(False)
            name = None
            if channel is not None:
                name = f"fastshm.{channel}.{os.urandom(8).hex()}"
            self._pool = SlotPool(slot_size, slots, name=name, mode=mode, group=group)
            try:
                self._probe = H.Probe(mode, group)
            except BaseException:
                self._pool.close()
                raise
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._url = _format_url(family, listener.getsockname())
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._peers: Dict[int, _Peer] = {}
        self._ready: List[_Peer] = []
        self._seq = 0
        self._last_service = 0.0
        self._low_water = max(1, slots // 2)
        self._send_timeout = send_timeout
        self._segment_info = P.SegmentInfo(
            _SEGMENT_ID, slots, self._pool.segment.size, self._pool.data_offset,
            self._pool.slot_stride, self._pool.slot_size, self._pool.segment.name)
        self._stats = {"sent": 0, "bytes": 0, "unsent": 0, "connections": 0,
                       "disconnections": 0, "protocol_errors": 0}
        self._closed = False

    # -- properties ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL subscribers connect to (with the real port when 0 was asked)."""
        return self._url

    @property
    def segment_name(self) -> str:
        """The name of the pool's segment."""
        return self._pool.segment.name

    @property
    def slot_size(self) -> int:
        """The largest payload a slot holds."""
        return self._pool.slot_size

    @property
    def subscribers(self) -> int:
        """How many subscribers are connected and past the handshake."""
        return len(self._ready)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def fileno(self) -> int:
        """A descriptor that polls readable when the publisher has work to do.

        Register it with an event loop and call :meth:`poll` (``timeout=0``)
        when it is readable: that accepts subscribers and takes releases.
        """
        return self._epoll.fileno()

    def stats(self) -> Dict[str, int]:
        """Counters: messages sent, bytes, unsent (no subscriber), slots and peers."""
        out = dict(self._stats)
        out.update(subscribers=len(self._ready), slots=self._pool.slots,
                   slots_free=self._pool.free_count,
                   slots_held=self._pool.slots - self._pool.free_count)
        return out

    # -- sending ------------------------------------------------------------------

    def send(self, data: Any, timeout: Optional[float] = None, *, meta: bytes = b"") -> int:
        """Copy ``data`` into a free slot and send its address to every subscriber.

        Parameters
        ----------
        data : bytes-like
            Any contiguous buffer (``bytes``, ``bytearray``, ``memoryview``,
            a C-contiguous numpy array).  Large copies release the GIL.
        timeout : float, optional
            How long to wait for a free slot when subscribers hold them all;
            defaults to the publisher's ``send_timeout``.
        meta : bytes
            Up to 1024 bytes of metadata delivered with the message.

        Returns
        -------
        int
            How many subscribers the message was sent to (0 when none is
            connected: the message is dropped, as in any publish/subscribe).

        Raises
        ------
        Full
            If no slot became free in time.
        ValueError
            If the payload is larger than ``slot_size``, or the publisher is
            closed.
        """
        if self._closed:
            raise ValueError("publisher is closed")
        pool = self._pool
        now = time.monotonic()
        if pool.free_count <= self._low_water or now - self._last_service >= _SERVICE_INTERVAL:
            self._service(0)
        slot = pool.acquire()
        if slot is None:
            slot = self._wait_for_slot(self._send_timeout if timeout is None else timeout)
        stamp = time.time_ns()
        try:
            n = pool.segment.write(pool.offset(slot), data, pool.slot_size)
        except BaseException:
            pool.discard(slot)
            raise
        return self._publish(slot, n, meta, stamp)

    def _publish(self, slot: int, nbytes: int, meta: bytes, stamp: int) -> int:
        pool = self._pool
        self._seq += 1
        ready = self._ready
        if not ready:
            pool.discard(slot)
            self._stats["unsent"] += 1
            return 0
        gen = pool.generation(slot)
        address = Address(_SEGMENT_ID, pool.offset(slot), nbytes, gen, self._seq, slot=slot,
                          timestamp_ns=stamp, meta=meta)
        inline_address = None
        for peer in ready:
            if peer.inline is not None:
                if inline_address is None:
                    inline_address = Address(
                        _SEGMENT_ID, address.offset, nbytes, gen, self._seq, slot=slot,
                        timestamp_ns=stamp, flags=address.flags | FLAG_INLINE, meta=meta)
                    payload = memoryview(pool.segment)[address.offset:address.offset + nbytes]
                peer.inline.queue(inline_address, payload, slot, gen)
            else:
                peer.stream.queue_address(address)
            peer.held[slot] = gen
        pool.commit(slot, len(ready))
        delivered = len(ready)
        for peer in list(ready):
            try:
                peer.stream.flush(0)
            except OSError as exc:
                self._drop(peer, f"send failed: {exc}")
            else:
                if peer.inline is not None:
                    self._settle(peer)
        self._stats["sent"] += 1
        self._stats["bytes"] += nbytes
        return delivered

    def _settle(self, peer: _Peer) -> None:
        """Take back the slots whose payload went out in full to an inline subscriber."""
        assert peer.inline is not None
        for slot, generation in peer.inline.settled():
            if peer.held.get(slot) == generation:
                del peer.held[slot]
                self._pool.release(slot, generation)

    def _wait_for_slot(self, timeout: Optional[float]) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise Full(
                    f"no free slot within {timeout} s: all {self._pool.slots} slots are held "
                    f"by {len(self._ready)} subscriber(s)")
            self._service(wait if wait is None or wait < 1.0 else 1.0)
            slot = self._pool.acquire()
            if slot is not None:
                return slot

    # -- serving ------------------------------------------------------------------

    def poll(self, timeout: Optional[float] = 0) -> int:
        """Serve connections, handshakes and releases; wait up to ``timeout`` for some.

        Returns
        -------
        int
            How many sockets had work.
        """
        if self._closed:
            return 0
        return self._service(timeout)

    def wait_for_subscribers(self, n: int = 1, timeout: Optional[float] = None) -> int:
        """Serve until at least ``n`` subscribers are connected.

        Raises
        ------
        TimeoutError
            If fewer than ``n`` connected within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._ready) < n:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise TimeoutError(
                    f"{len(self._ready)} of {n} subscriber(s) connected to {self._url} "
                    f"within {timeout} s")
            self._service(wait if wait is None or wait < 0.1 else 0.1)
        return len(self._ready)

    def _service(self, timeout: Optional[float]) -> int:
        now = self._last_service = time.monotonic()
        pending = [p for p in self._peers.values() if p.stream.pending]
        if pending:
            for peer in pending:
                try:
                    peer.stream.flush(0)
                except OSError as exc:
                    self._drop(peer, f"send failed: {exc}")
                else:
                    if peer.inline is not None:
                        self._settle(peer)
            if timeout is None or timeout > 0.01:
                timeout = 0.01
        if len(self._peers) > len(self._ready):
            timeout = self._expire_handshakes(now, timeout)
        try:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return 0
        listener_fd = self._listener.fileno()
        for fd, _ in events:
            if fd == listener_fd:
                self._accept()
            else:
                known = self._peers.get(fd)
                if known is not None:
                    self._serve(known)
        return len(events)

    def _expire_handshakes(self, now: float, timeout: Optional[float]) -> Optional[float]:
        """Drop connections past their handshake deadline; shorten ``timeout`` to the next."""
        nearest = None
        for peer in list(self._peers.values()):
            hs = peer.handshake
            if peer.ready or hs is None:
                continue
            if hs.expired(now):
                self._refuse(peer, P.ERR_TIMEOUT,
                             f"handshake not finished within {self._handshake_timeout} s")
            elif nearest is None or hs.deadline < nearest:
                nearest = hs.deadline
        if nearest is not None:
            wait = max(nearest - now, 0.0) + 0.001
            if timeout is None or wait < timeout:
                return wait
        return timeout

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept on %s failed: %s", self._url, exc)
                return
            name = _format_url(sock.family, address) if address else "unix peer"
            if len(self._peers) - len(self._ready) >= H.MAX_HANDSHAKES:
                log.warning("refusing connection from %s to %s: %d connections are already in "
                            "the handshake", name, self._url, H.MAX_HANDSHAKES)
                sock.close()
                continue
            _tune(sock)
            peer = _Peer(sock, name)
            peer.handshake = H.ServerHandshake(
                peer.stream, secret=self._secret, probe=self._probe,
                max_payload=self._pool.slot_size, announce=self._announce,
                timeout=self._handshake_timeout)
            self._peers[sock.fileno()] = peer
            self._epoll.register(sock.fileno(), select.EPOLLIN)
            self._stats["connections"] += 1

    def _serve(self, peer: _Peer) -> None:
        try:
            peer.stream.fill(0)
            while True:
                frame = peer.stream.next_frame()
                if frame is None:
                    break
                self._on_frame(peer, frame[0], frame[1])
                if peer.stream.fileno() not in self._peers:
                    return
        except Disconnected:
            self._drop(peer, "closed by peer")
        except ProtocolError as exc:
            self._stats["protocol_errors"] += 1
            self._refuse(peer, getattr(exc, "code", P.ERR_PROTOCOL), str(exc))
        except AuthenticationError as exc:
            self._stats["auth_failures"] = self._stats.get("auth_failures", 0) + 1
            self._refuse(peer, P.ERR_AUTH, str(exc))
        except OSError as exc:
            self._drop(peer, f"connection failed: {exc}")

    def _on_frame(self, peer: _Peer, ftype: int, body: Any) -> None:
        if ftype == P.RELEASE and peer.ready:
            pool = self._pool
            held = peer.held
            for segment_id, slot, generation in P.unpack_releases(body):
                if segment_id != _SEGMENT_ID or held.get(slot) != generation:
                    raise ProtocolError(
                        f"release of slot {slot} generation {generation}, which the peer "
                        f"does not hold")
                del held[slot]
                pool.release(slot, generation)
        elif not peer.ready and ftype != P.BYE:
            assert peer.handshake is not None
            done = peer.handshake.on_frame(ftype, body)
            peer.stream.flush(0)
            if done:
                hs = peer.handshake
                peer.identity = hs.identity
                peer.window = hs.window
                if hs.inline:
                    peer.inline = H.InlineQueue(peer.stream)
                peer.ready = True
                self._ready.append(peer)
                log.debug("subscriber %s (%s) connected to %s, %s", peer.name, peer.identity,
                          self._url, "inline" if hs.inline else "shared memory")
        elif ftype == P.PING:
            if peer.stream.pending - peer.stream.pending_payload > H.MAX_BACKLOG:
                raise ProtocolError("peer does not read its replies")
            peer.stream.queue(P.PONG, body)
        elif ftype == P.BYE:
            self._drop(peer, "said goodbye")
        else:
            raise ProtocolError(f"unexpected {P.FRAME_NAMES.get(ftype, ftype)} frame")

    def _announce(self, stream: Stream) -> None:
        stream.queue(P.SEGMENT, P.pack_segment(self._segment_info))

    def _refuse(self, peer: _Peer, code: int, reason: str) -> None:
        log.warning("closing connection from %s to %s: %s", peer.name, self._url, reason)
        try:
            peer.stream.queue(P.ERROR, P.pack_reason(code, reason))
            peer.stream.flush(0)
        except OSError:
            pass
        self._drop(peer, reason, quiet=True)

    def _drop(self, peer: _Peer, reason: str, quiet: bool = False) -> None:
        fd = peer.stream.fileno()
        if self._peers.pop(fd, None) is None:
            return
        if not quiet:
            log.debug("subscriber %s left %s: %s", peer.name, self._url, reason)
        self._stats["disconnections"] += 1
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        peer.stream.close()
        peer.sock.close()
        if peer.ready:
            self._ready.remove(peer)
        for slot, generation in peer.held.items():
            self._pool.release(slot, generation)
        peer.held.clear()

    # -- closing ------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye to subscribers, stop listening and unlink the segment.

        Subscribers holding messages keep reading them: their mappings stay
        valid after the segment's name is gone.
        """
        if self._closed:
            return
        self._closed = True
        for peer in list(self._peers.values()):
            try:
                if peer.ready:
                    peer.stream.queue(P.BYE, P.pack_reason(P.BYE_CLOSING, "publisher closed"))
                    peer.stream.flush(0.1)
                # Unread input makes close() reset the connection, which can discard
                # the BYE before the subscriber reads it: drain it first.
                while peer.stream.fill(0):
                    while peer.stream.next_frame() is not None:
                        pass
            except (OSError, ValueError):
                pass
            self._drop(peer, "publisher closed", quiet=True)
        self._epoll.close()
        self._listener.close()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except FileNotFoundError:
                pass
        try:
            if self._probe is not None:
                self._probe.close()
        finally:
            self._pool.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return (f"<fastshm.Publisher {self._url} slots={self._pool.slots}x{self._pool.slot_size}"
                f" subscribers={len(self._ready)}{' closed' if self._closed else ''}>")


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket file left by a dead publisher; refuse to steal a live one."""
    try:
        import stat as _stat
        if not _stat.S_ISSOCK(os.stat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another publisher is listening there", path)


def _connect(url: str, timeout: Optional[float]) -> socket.socket:
    family, address = parse_url(url)
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            sock.settimeout(left)
            sock.connect(address)
            _tune(sock)
            return sock
        except OSError as exc:
            sock.close()
            retry = exc.errno in _CONNECT_RETRY or isinstance(exc, ConnectionRefusedError)
            if not retry or (deadline is not None and time.monotonic() + delay > deadline):
                if isinstance(exc, (socket.timeout, TimeoutError)) or retry:
                    raise TimeoutError(
                        f"could not connect to {url} within {timeout} s: {exc}") from exc
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class Subscriber:
    """Receive messages from a publisher: zero-copy views of its shared memory.

    Parameters
    ----------
    url : str
        The publisher's route (:attr:`Publisher.url`).
    connect_timeout : float, optional
        How long to keep trying while the publisher is not there yet
        (``None``: forever).
    identity : str
        A name the publisher logs for this subscriber.
    secret : str or bytes, optional
        The shared secret (``FASTSHM_SECRET`` by default).  With one, the
        publisher must prove it knows it too.
    transport : str
        ``"auto"``: payloads stay in shared memory when this process proves it
        can map the publisher's (same host, same ``/dev/shm``), and come
        through the connection otherwise (``Message.inline``); ``"shm"``:
        shared memory or an error; ``"inline"``: always through the connection.
    handshake_timeout : float, optional
        Seconds the publisher has to finish the handshake (``None``: only the
        timeouts of :meth:`receive` and :meth:`wait_ready` apply).

    Examples
    --------
    >>> with Subscriber("tcp://127.0.0.1:5555") as sub:
    ...     for msg in sub:
    ...         with msg:
    ...             process(memoryview(msg))
    """

    def __init__(self, url: str, *, connect_timeout: Optional[float] = 10.0,
                 identity: str = "", secret: H.SecretLike = None, transport: str = "auto",
                 handshake_timeout: Optional[float] = None) -> None:
        self._url = url
        self._closed = True
        secret_bytes = H.resolve_secret(secret)
        if transport not in ("auto", "shm", "inline"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'inline', not {transport!r}")
        self._sock = _connect(url, connect_timeout)
        self._stream = Stream(self._sock)
        self._segments: Dict[int, PeerSegment] = {}
        self._stats = {"received": 0, "bytes": 0}
        self._closed = False
        self._gone: Optional[BaseException] = None
        self._said_bye = False
        self._output_broken = False
        self._handshake = H.ClientHandshake(
            self._stream, secret=secret_bytes, transport=transport, identity=identity,
            url=url, timeout=handshake_timeout)
        self._handshake.start()
        try:
            self._stream.flush(connect_timeout)
        except OSError:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The publisher's route."""
        return self._url

    @property
    def closed(self) -> bool:
        """True once the subscriber was closed, or the publisher went away."""
        return self._closed

    def fileno(self) -> int:
        """The socket's descriptor: readable when a message (or a control frame) arrived."""
        return self._stream.fileno()

    def stats(self) -> Dict[str, int]:
        """Counters: messages and bytes received, releases waiting to be sent."""
        out = dict(self._stats)
        out["pending_output"] = self._stream.pending if not self._closed else 0
        return out

    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the next message, or ``None`` if none came within ``timeout`` seconds.

        ``timeout=None`` waits as long as it takes; ``0`` only looks.

        Raises
        ------
        Disconnected
            When the publisher closed the route or went away.
        ProtocolError, GenerationError
            When the publisher sent something invalid; the connection is closed.
        """
        if self._closed:
            raise self._gone if self._gone is not None else Disconnected("subscriber is closed")
        stream = self._stream
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                frame = stream.next_frame()
                if frame is None:
                    wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    left = self._handshake.remaining()
                    if left is not None and (wait is None or left < wait):
                        wait = left
                    if stream.pending and not self._output_broken:
                        try:
                            stream.flush(wait)
                        except ConnectionError:
                            # Read what the publisher sent before it went (a BYE, say).
                            self._output_broken = True
                    if stream.fill(wait) == 0:
                        return None
                    continue
                ftype, body = frame
                if ftype == P.ADDRESS:
                    segment = self._segments.get(body.segment_id)
                    if segment is None:
                        raise ProtocolError(f"address names unannounced segment {body.segment_id}")
                    msg = segment.message(body, stream)
                    self._stats["received"] += 1
                    self._stats["bytes"] += msg.nbytes
                    return msg
                if ftype == P.INLINE:
                    if not self._handshake.inline:
                        raise ProtocolError("INLINE frame on a shared-memory connection")
                    msg = Message._local(body[1], body[0])
                    self._stats["received"] += 1
                    self._stats["bytes"] += msg.nbytes
                    return msg
                self._on_control(ftype, body)
        except Disconnected as exc:
            self._shutdown(exc)
            raise
        except ConnectionError as exc:
            gone = Disconnected(f"connection to publisher at {self._url} lost: {exc}")
            self._shutdown(gone)
            raise gone from exc
        except (OSError, ValueError, LookupError) as exc:
            self._shutdown(exc)
            raise

    @property
    def ready(self) -> bool:
        """True once the handshake is done (and the publisher's segment mapped, if shared)."""
        hs = self._handshake
        return hs.done and (hs.inline or bool(self._segments))

    @property
    def transport(self) -> Optional[str]:
        """``"shm"`` or ``"inline"`` once the handshake chose; None before."""
        hs = self._handshake
        return None if not hs.done else ("inline" if hs.inline else "shm")

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Finish the handshake: wait until the publisher's segment is mapped.

        Not needed before :meth:`receive` (which finishes it by itself); useful
        to know that messages sent from now on will reach this subscriber.

        Raises
        ------
        TimeoutError
            If the publisher did not answer in time (it answers while it is
            sending, polling or waiting for subscribers).
        """
        if self._closed:
            raise self._gone if self._gone is not None else Disconnected("subscriber is closed")
        stream = self._stream
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.ready:
                frame = stream.next_frame()
                if frame is None:
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    left = self._handshake.remaining()
                    if left is not None and (wait is None or left < wait):
                        wait = left
                    if stream.pending:
                        stream.flush(wait)
                    stream.fill(wait)
                elif frame[0] in (P.ADDRESS, P.INLINE):
                    raise ProtocolError(f"{P.FRAME_NAMES[frame[0]]} before the handshake ended")
                else:
                    self._on_control(frame[0], frame[1])
        except Disconnected as exc:
            self._shutdown(exc)
            raise
        except ConnectionError as exc:
            gone = Disconnected(f"connection to publisher at {self._url} lost: {exc}")
            self._shutdown(gone)
            raise gone from exc
        except (OSError, ValueError, LookupError) as exc:
            self._shutdown(exc)
            raise
        if not self.ready:
            # The caller's timeout: the subscriber stays usable.
            raise TimeoutError(f"publisher at {self._url} did not answer within {timeout} s")

    def _on_control(self, ftype: int, body: bytes) -> None:
        if ftype == P.SEGMENT:
            if not self._handshake.shm:
                raise ProtocolError("SEGMENT before the handshake chose shared memory")
            info = P.unpack_segment(body)
            if info.segment_id in self._segments:
                raise ProtocolError(f"segment id {info.segment_id} announced twice")
            if len(self._segments) >= H.MAX_SEGMENTS:
                raise ProtocolError(f"publisher announced more than {H.MAX_SEGMENTS} segments")
            H.check_peer_name(info.name.encode("ascii"), "SEGMENT")
            try:
                segment = Segment.open(info.name, readonly=True)
            except FileNotFoundError as exc:
                raise Disconnected(
                    f"segment '{info.name}' of publisher at {self._url} is gone: the "
                    f"publisher closed before this subscriber mapped it") from exc
            if segment.size != info.size:
                size = segment.size
                segment.close()
                raise ProtocolError(
                    f"segment '{info.name}' is {size} bytes, announced as {info.size}")
            self._segments[info.segment_id] = PeerSegment(
                segment, info.segment_id, info.slot_count, info.data_offset,
                info.slot_stride, info.slot_size)
        elif ftype in (P.HELLO, P.AUTH, P.PROBE):
            self._handshake.on_frame(ftype, body)
            self._stream.flush(0)
        elif ftype == P.BYE:
            code, text = P.unpack_reason(body)
            self._said_bye = True
            raise Disconnected(f"publisher at {self._url} closed the route: {text}")
        elif ftype == P.ERROR:
            code, text = P.unpack_reason(body)
            if code == P.ERR_AUTH:
                raise AuthenticationError(f"publisher at {self._url} refused this subscriber: "
                                          f"{text}")
            raise ProtocolError(f"publisher at {self._url} refused this subscriber: {text}")
        elif ftype == P.PING:
            self._stream.queue(P.PONG, body)
        else:
            raise ProtocolError(f"unexpected {P.FRAME_NAMES.get(ftype, ftype)} frame")

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the publisher closes the route."""
        while True:
            try:
                msg = self.receive()
            except Disconnected:
                if self._said_bye:
                    return
                raise
            if msg is not None:
                yield msg

    def flush(self, timeout: Optional[float] = None) -> None:
        """Send the releases waiting to go back to the publisher now."""
        if not self._closed:
            self._stream.flush(timeout)

    def _shutdown(self, exc: Optional[BaseException]) -> None:
        if self._closed:
            return
        self._closed = True
        self._gone = exc
        self._stream.close()
        self._sock.close()
        # Messages still alive keep their segments mapped; the rest unmap now.
        for segment in self._segments.values():
            try:
                segment.segment.close()
            except BufferError:
                pass
        self._segments.clear()

    def close(self) -> None:
        """Give back released slots, say goodbye and disconnect.

        Messages still held stay readable: they keep their mapping alive.
        """
        if self._closed:
            return
        try:
            self._stream.queue(P.BYE, P.pack_reason(P.BYE_CLOSING, "subscriber closed"))
            self._stream.flush(0.1)
        except OSError:
            pass
        self._shutdown(None)

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<fastshm.Subscriber {self._url}{' closed' if self._closed else ''}>"
