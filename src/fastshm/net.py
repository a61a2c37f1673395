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
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from contextlib import contextmanager

from fastshm import handshake as H
from fastshm import protocol as P
from fastshm._core import (
    FLAG_INLINE, FLAG_NDARRAY, Address, Message, PeerSegment, Segment, Stream, check_name,
)
from fastshm.arrays import is_ndarray, pack_array_meta
from fastshm.errors import AuthenticationError, Disconnected, Full, ProtocolError
from fastshm.pool import SlotPool

#: What a publisher does with a message for a subscriber that has no credit left.
POLICIES = ("block", "drop", "latest")

__all__ = ["Publisher", "Subscriber", "parse_url", "POLICIES"]

log = logging.getLogger("fastshm")

_SEGMENT_ID = 1
_CONNECT_RETRY = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
# Serve the sockets at least this often while sending, even with free slots.
_SERVICE_INTERVAL = 0.001
# Payloads at least this large take releases in before each send, so that the slot
# freed last (still in the CPU cache) is the one reused; one poll costs little
# next to their copy.
_SERVICE_EVERY_SEND = 65536
# Inside batch(), queued frames go out once this many bytes wait.
_BATCH_FLUSH_BYTES = 65536

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


def _tune(sock: socket.socket, keepalive: Optional[float]) -> None:
    """Non-blocking, no Nagle delay, and a bounded time to notice a vanished peer.

    A peer that disappears without closing its connection (power loss, a
    container killed with its network) is noticed by TCP keepalive probes
    after about ``2 * keepalive`` seconds of silence, and by
    ``TCP_USER_TIMEOUT`` when data it should acknowledge is left unacknowledged.
    """
    sock.setblocking(False)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        idle = max(1, int(keepalive))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, idle * 2000)


class _Peer:
    """The publisher's view of one subscriber connection."""

    __slots__ = ("sock", "stream", "ready", "held", "identity", "name", "sent", "window",
                 "drops", "latest", "handshake", "inline", "writing")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.stream = Stream(sock)
        self.ready = False
        # slot -> generation of every message sent to this peer and not yet released
        self.held: Dict[int, int] = {}
        self.identity = ""
        self.name = name
        self.sent = 0
        self.window = 0
        self.drops = 0
        self.handshake: Optional[H.ServerHandshake] = None
        self.inline: Optional[H.InlineQueue] = None
        # True while output waits for the socket: the epoll set then watches EPOLLOUT.
        self.writing = False
        # policy "latest": the newest message waiting for credit (slot, generation, address)
        self.latest: Optional[Tuple[int, int, Address]] = None

    def has_credit(self) -> bool:
        return len(self.held) < self.window

    def report(self) -> Dict[str, Any]:
        return {"name": self.name, "identity": self.identity, "held": len(self.held),
                "window": self.window, "credit": self.window - len(self.held),
                "sent": self.sent, "drops": self.drops, "waiting": self.latest is not None,
                "transport": "inline" if self.inline is not None else "shm"}


_Closing = TypeVar("_Closing", bound="_Closes")


class _Closes:
    """Context management and a last-resort close for objects that own sockets and segments."""

    _closed: bool

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self: _Closing) -> _Closing:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass


class Publisher(_Closes):
    """Publish payloads through shared memory to subscribers on a route.

    Parameters
    ----------
    url : str or sequence of str
        Where to listen: ``tcp://127.0.0.1:5555``, ``tcp://127.0.0.1:0`` (a
        free port; read :attr:`url`), ``unix:///run/fastshm/cam.sock``; or a
        list of them, to serve subscribers on several routes at once.
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
        slot (or, with ``policy="block"``, for a subscriber's credit);
        ``None`` waits as long as it takes.
    policy : {"block", "drop", "latest"}
        What to do when a subscriber has no credit left (it holds ``window``
        unreleased messages): ``block`` waits for it up to the timeout, then
        raises :class:`Full`; ``drop`` skips it for that message (counted in
        :meth:`stats`); ``latest`` keeps only the newest message waiting for
        it and delivers that one as soon as it releases something.  With
        ``drop`` and ``latest`` a slow subscriber never slows the others, as
        long as the pool has more slots than the slow subscribers can hold.
    window : int, optional
        Credit given to subscribers that do not ask for their own: ``slots``
        with ``block``, half the slots with ``drop`` and ``latest``.
    keepalive : float
        Seconds of silence after which TCP keepalive probes a subscriber;
        one that vanished without closing is dropped, and its slots freed,
        about ``2 * keepalive`` seconds later.  0 turns probing off.
    secret : str or bytes, optional
        A shared secret every subscriber must prove it knows (HMAC-SHA256
        challenge-response, both ways); ``FASTSHM_SECRET`` by default.
    insecure : bool
        Allow listening on a non-loopback TCP address without a secret.
    handshake_timeout : float
        Seconds a new connection has to finish the handshake.

    Notes
    -----
    With a ``channel``, segments of publishers of that channel that died
    without cleaning up (their owner lock is gone) are removed at start.

    Examples
    --------
    >>> with Publisher("tcp://127.0.0.1:5555", slot_size=6_220_800) as pub:
    ...     pub.wait_for_subscribers(1, timeout=10)
    ...     pub.send(frame)
    """

    def __init__(self, url: Union[str, Sequence[str]], *, slot_size: int, slots: int = 8,
                 channel: Optional[str] = None, mode: int = 0o600,
                 group: Optional[int] = None, send_timeout: Optional[float] = None,
                 policy: str = "block", window: Optional[int] = None,
                 keepalive: float = 5.0, secret: H.SecretLike = None, insecure: bool = False,
                 handshake_timeout: float = H.DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        if slot_size <= 0 or slots <= 0:
            raise ValueError("slot_size and slots must be positive")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if window is not None and window <= 0:
            raise ValueError("window must be positive")
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("a publisher needs at least one URL")
        endpoints = [parse_url(u) for u in urls]
        self._secret = H.resolve_secret(secret)
        for u, (family, address) in zip(urls, endpoints):
            H.check_bind(family, address, u, self._secret, insecure)
        self._handshake_timeout = float(handshake_timeout)
        self._probe: Optional[H.Probe] = None
        self._closed = True
        self._unix_paths: List[str] = []
        self._listeners: Dict[int, socket.socket] = {}
        try:
            for family, address in endpoints:
                listener = socket.socket(family, socket.SOCK_STREAM)
                self._listeners[listener.fileno()] = listener
                path = address if family == socket.AF_UNIX and isinstance(address, str) \
                    and not address.startswith("\0") else None
                if family != socket.AF_UNIX:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if path is not None:
                    _remove_stale_socket(path)
                listener.bind(address)
                if path is not None:
                    self._unix_paths.append(path)
                listener.listen(64)
                listener.setblocking(False)
            name = None
            prefix = "fastshm."
            if channel is not None:
                from fastshm.admin import reap
                prefix = f"fastshm.{channel}."
                check_name(prefix + "x")  # the channel becomes part of segment names
                for gone in reap(prefix=prefix, min_age=0.5):
                    log.info("removed segment %s of a dead publisher of channel %s",
                             gone, channel)
                name = f"{prefix}{os.urandom(8).hex()}"
            self._pool = SlotPool(slot_size, slots, name=name, mode=mode, group=group)
            try:
                self._probe = H.Probe(mode, group, prefix)
            except BaseException:
                self._pool.close()
                raise
        except BaseException:
            self._close_listeners()
            raise
        self._urls = [_format_url(sock.family, sock.getsockname())
                      for sock in self._listeners.values()]
        self._url = self._urls[0]
        self._epoll = select.epoll()
        for fd in self._listeners:
            self._epoll.register(fd, select.EPOLLIN)
        self._peers: Dict[int, _Peer] = {}
        self._ready: List[_Peer] = []
        self._seq = 0
        self._last_service = 0.0
        self._send_timeout = send_timeout
        self._policy = policy
        self._window = window or (slots if policy == "block" else max(1, slots // 2))
        self._keepalive = keepalive
        self._segment_info = P.SegmentInfo(
            _SEGMENT_ID, slots, self._pool.segment.size, self._pool.data_offset,
            self._pool.slot_stride, self._pool.slot_size, self._pool.segment.name)
        self._stats = {"sent": 0, "bytes": 0, "unsent": 0, "drops": 0, "connections": 0,
                       "disconnections": 0, "protocol_errors": 0, "auth_failures": 0}
        self._last_delivered = 0
        self._corked = 0
        self._pins: "Dict[int, weakref.ref[Any]]" = {}
        self._closed = False

    # -- properties ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL subscribers connect to (with the real port when 0 was asked).

        The first one, when the publisher listens on several.
        """
        return self._url

    @property
    def urls(self) -> List[str]:
        """Every URL the publisher listens on."""
        return list(self._urls)

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

    @property
    def policy(self) -> str:
        """The overflow policy: ``block``, ``drop`` or ``latest``."""
        return self._policy

    def stats(self) -> Dict[str, Any]:
        """Counters and state.

        Returns
        -------
        dict
            ``sent``, ``bytes``, ``unsent`` (no subscriber was connected),
            ``drops`` (messages a subscriber missed for lack of credit, with
            ``drop``, or that a newer one replaced, with ``latest``),
            ``connections``, ``disconnections``, ``protocol_errors``,
            ``subscribers``, ``slots``, ``slots_free``, ``slots_held``, and
            ``peers``: one dict per subscriber (``held``, ``window``,
            ``credit``, ``sent``, ``drops``, ``waiting``, ``transport``: ``"shm"`` or
            ``"inline"``); ``auth_failures`` counts refused secrets.
        """
        out: Dict[str, Any] = dict(self._stats)
        out.update(subscribers=len(self._ready), slots=self._pool.slots,
                   slots_free=self._pool.free_count,
                   slots_held=self._pool.slots - self._pool.free_count,
                   policy=self._policy, peers=[p.report() for p in self._ready])
        return out

    # -- sending ------------------------------------------------------------------

    def send(self, data: Any, timeout: Optional[float] = None, *, meta: bytes = b"") -> int:
        """Copy ``data`` into a free slot and send its address to every subscriber.

        Parameters
        ----------
        data : bytes-like or numpy.ndarray
            Any contiguous buffer (``bytes``, ``bytearray``, ``memoryview``).
            A numpy array travels with its dtype and shape (read them back
            with :meth:`Message.array`); a non-contiguous one is copied
            straight into the slot.  Large copies release the GIL.
        timeout : float, optional
            How long to wait for a free slot (and, with ``policy="block"``,
            for every subscriber's credit); defaults to ``send_timeout``.
        meta : bytes
            Up to 1024 bytes of metadata delivered with the message.

        Returns
        -------
        int
            How many subscribers the message is for (sent now, or waiting for
            credit with ``latest``); 0 when none is connected: the message is
            dropped, as in any publish/subscribe.

        Raises
        ------
        Full
            If no slot (or credit, with ``block``) became free in time.
        ValueError
            If the payload is larger than ``slot_size``, or the publisher is
            closed.
        """
        flags = 0
        if is_ndarray(data):
            meta = pack_array_meta(data.dtype, data.shape) + meta
            flags = FLAG_NDARRAY
            if not data.flags.c_contiguous:
                with self._loan_array(data.shape, data.dtype, timeout, meta) as dest:
                    dest[...] = data
                    del dest
                return self._last_delivered
        try:
            size = data.nbytes if hasattr(data, "nbytes") else len(data)
        except TypeError:
            size = 0
        slot = self._take_slot(timeout, size)
        pool = self._pool
        stamp = time.time_ns()
        try:
            n = pool.segment.write(pool.offset(slot), data, pool.slot_size)
        except BaseException:
            pool.discard(slot)
            raise
        return self._publish(slot, n, meta, stamp, flags)

    @contextmanager
    def loan(self, nbytes: int, timeout: Optional[float] = None, *,
             meta: bytes = b"") -> Iterator[memoryview]:
        """Lend a writable view of a free slot; publish it when the block ends.

        The zero-copy way to send: fill the buffer in place (read a file or a
        camera into it, ``numpy.frombuffer`` it), and leaving the ``with``
        block sends its address.  An exception inside the block discards the
        slot instead.

        Parameters
        ----------
        nbytes : int
            The payload's length: the view has exactly this many bytes.
        timeout, meta
            As for :meth:`send`.

        Raises
        ------
        BufferError
            At the end of the block, if views made from the loaned buffer
            are still alive: the slot is then discarded, not published, since
            they could still write into it.

        Examples
        --------
        >>> with pub.loan(len(header) + n) as buf:
        ...     buf[:len(header)] = header
        ...     f.readinto(buf[len(header):])
        """
        if not 0 <= nbytes <= self._pool.slot_size:
            raise ValueError(f"cannot loan {nbytes} bytes: slots hold {self._pool.slot_size}")
        slot = self._take_slot(timeout, nbytes)
        view, before = self._lend(slot, nbytes)
        stamp = time.time_ns()
        try:
            yield view
        except BaseException:
            self._end_loan(view, before)
            self._pool.discard(slot)
            raise
        if not self._end_loan(view, before):
            self._pool.discard(slot)
            raise BufferError("views of the loaned buffer are still alive: the message was "
                              "discarded, since they could still change it")
        self._publish(slot, nbytes, meta, stamp, 0)

    @contextmanager
    def loan_array(self, shape: Any, dtype: Any = "uint8", timeout: Optional[float] = None, *,
                   meta: bytes = b"") -> Iterator[Any]:
        """Lend a slot as a writable numpy array; publish it when the block ends.

        Like :meth:`loan`, but the view is an array of ``shape`` and ``dtype``
        and the reader's :meth:`Message.array` gets the same shape and dtype.
        An array cannot be revoked the way a memoryview is released: while the
        array (or any view of it) is alive after the block, its slot is kept
        out of reuse, and writing to it would change what subscribers read —
        do not.
        """
        import numpy as np

        dims = (int(shape),) if isinstance(shape, int) else tuple(int(n) for n in shape)
        dt = np.dtype(dtype)
        with self._loan_array(dims, dt, timeout, pack_array_meta(dt, dims) + meta) as arr:
            yield arr

    @contextmanager
    def _loan_array(self, shape: Tuple[int, ...], dtype: Any, timeout: Optional[float],
                    meta: bytes) -> Iterator[Any]:
        """Loan a slot as an array; ``meta`` already holds the array descriptor."""
        import numpy as np

        count = 1
        for n in shape:
            count *= int(n)
        nbytes = count * dtype.itemsize
        if nbytes > self._pool.slot_size:
            raise ValueError(f"array of {nbytes} bytes does not fit in {self._pool.slot_size}")
        slot = self._take_slot(timeout, nbytes)
        generation = self._pool.generation(slot)
        view, _ = self._lend(slot, nbytes)
        stamp = time.time_ns()
        base = np.frombuffer(view, dtype=dtype, count=count)
        arr = base.reshape(shape)
        try:
            yield arr
        except BaseException:
            del arr
            self._after_views(base, view, lambda: self._pool.discard(slot))
            raise
        del arr
        self._publish(slot, nbytes, meta, stamp, FLAG_NDARRAY, extra_holders=1)
        self._after_views(base, view, lambda: self._pool.release(slot, generation))

    def _after_views(self, base: Any, view: memoryview, then: Callable[[], Any]) -> None:
        """Call ``then`` once no array made from ``base`` is alive (now, if none is)."""
        def done(ref: "weakref.ref[Any]") -> None:
            self._pins.pop(id(ref), None)
            view.release()
            if not self._closed:
                then()

        ref = weakref.ref(base, done)
        self._pins[id(ref)] = ref

    @contextmanager
    def batch(self) -> Iterator["Publisher"]:
        """Send the addresses of several messages in as few syscalls as possible.

        Inside the block, :meth:`send` and the loans queue each address
        instead of writing it to the sockets at once; the queue goes out when
        it reaches 64 KiB and when the block ends.  For streaming many small
        messages; outside a batch every message goes out immediately, for the
        lowest latency.

        Examples
        --------
        >>> with pub.batch():
        ...     for reading in readings:
        ...         pub.send(reading)
        """
        self._corked += 1
        try:
            yield self
        finally:
            self._corked -= 1
            if not self._corked and not self._closed:
                for peer in list(self._ready):
                    self._flush(peer)

    def _lend(self, slot: int, nbytes: int) -> Tuple[memoryview, int]:
        """A writable view of ``nbytes`` of ``slot``, and the segment's export count before."""
        segment = self._pool.segment
        before = segment.exports
        offset = self._pool.offset(slot)
        with memoryview(segment) as whole:
            return whole[offset:offset + nbytes], before

    def _end_loan(self, view: memoryview, before: int) -> bool:
        """Release a loaned view; False if views made from it are still alive."""
        try:
            view.release()
        except BufferError:
            return False
        # Views made with memoryview(view) or slicing share one export of the segment.
        return self._pool.segment.exports <= before

    def _take_slot(self, timeout: Optional[float], nbytes: int) -> int:
        if self._closed:
            raise ValueError("publisher is closed")
        pool = self._pool
        if (nbytes >= _SERVICE_EVERY_SEND or pool.free_count <= 1
                or time.monotonic() - self._last_service >= _SERVICE_INTERVAL):
            self._service(0)
        if self._policy == "block" and self._starved() is not None:
            return self._wait_for_slot(self._send_timeout if timeout is None else timeout)
        slot = pool.acquire()
        if slot is None:
            slot = self._wait_for_slot(self._send_timeout if timeout is None else timeout)
        return slot

    def _starved(self) -> Optional[_Peer]:
        for peer in self._ready:
            if not peer.has_credit():
                return peer
        return None

    def _publish(self, slot: int, nbytes: int, meta: bytes, stamp: int, flags: int,
                 extra_holders: int = 0) -> int:
        """Send ``slot``'s address to every subscriber; ``extra_holders`` keep it too."""
        pool = self._pool
        self._seq += 1
        ready = self._ready
        if not ready:
            pool.commit(slot, extra_holders)
            self._stats["unsent"] += 1
            self._last_delivered = 0
            return 0
        gen = pool.generation(slot)
        address = Address._for_slot(_SEGMENT_ID, slot, pool.offset(slot), nbytes, gen,
                                    self._seq, stamp, flags, bytes(meta))
        holders = 0
        queued = []
        for peer in ready:
            if peer.has_credit():
                self._queue(peer, address)
                peer.held[slot] = gen
                peer.sent += 1
                queued.append(peer)
                holders += 1
            elif self._policy == "latest":
                older = peer.latest
                peer.latest = (slot, gen, address)
                holders += 1
                if older is not None:
                    pool.release(older[0], older[1])
                    peer.drops += 1
                    self._stats["drops"] += 1
            else:
                peer.drops += 1
                self._stats["drops"] += 1
        pool.commit(slot, holders + extra_holders)
        corked = self._corked
        for peer in queued:
            if corked and peer.stream.pending < _BATCH_FLUSH_BYTES:
                continue
            self._flush(peer)
        self._stats["sent"] += 1
        self._stats["bytes"] += nbytes
        self._last_delivered = holders
        return holders

    def _queue(self, peer: _Peer, address: Address) -> None:
        """Queue a message for ``peer``: its address, or its payload for an inline peer."""
        if peer.inline is None:
            peer.stream.queue_address(address)
            return
        # Sent straight from the slot, which stays held until the last byte is out.
        start = address.offset
        with memoryview(self._pool.segment) as whole:
            payload = whole[start:start + address.length]
        peer.inline.queue(Address(
            address.segment_id, start, address.length, address.generation, address.sequence,
            slot=address.slot, timestamp_ns=address.timestamp_ns,
            flags=address.flags | FLAG_INLINE, meta=address.meta), payload,
            address.slot, address.generation)

    def _flush(self, peer: _Peer) -> None:
        """Send what is queued for ``peer`` without waiting; drop it if it is gone."""
        try:
            peer.stream.flush(0)
        except OSError as exc:
            self._drop(peer, f"send failed: {exc}")
            return
        writing = bool(peer.stream.pending)
        if writing != peer.writing:
            # fileno() then turns readable when the socket takes more, so that an event
            # loop calls poll() and a large INLINE payload keeps going without a send().
            peer.writing = writing
            try:
                self._epoll.modify(peer.stream.fileno(),
                                   select.EPOLLIN | (select.EPOLLOUT if writing else 0))
            except (OSError, ValueError):
                pass
        if peer.inline is not None:
            # Slots whose payload went out in full come back, as a release would...
            pool = self._pool
            settled = peer.inline.settled()
            for slot, generation in settled:
                if peer.held.get(slot) == generation:
                    del peer.held[slot]
                    pool.release(slot, generation)
            # ... and so does the credit that a message waiting with "latest" needs.
            if settled and peer.latest is not None and peer.has_credit():
                slot, generation, address = peer.latest
                peer.latest = None
                self._queue(peer, address)
                peer.held[slot] = generation
                peer.sent += 1
                self._flush(peer)

    def _wait_for_slot(self, timeout: Optional[float]) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        block = self._policy == "block"
        while True:
            starved = self._starved() if block else None
            if starved is None:
                slot = self._pool.acquire()
                if slot is not None:
                    return slot
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                if starved is not None:
                    raise Full(
                        f"subscriber {starved.name} ({starved.identity}) released nothing "
                        f"within {timeout} s: it holds its whole window of {starved.window} "
                        f"message(s) (policy 'block'; 'drop' or 'latest' would skip it)")
                raise Full(
                    f"no free slot within {timeout} s: all {self._pool.slots} slots are held "
                    f"by {len(self._ready)} subscriber(s)")
            self._service(wait if wait is None or wait < 1.0 else 1.0)

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
        pending = [p for p in self._peers.values()
                   if p.stream.pending or (p.inline is not None and p.inline.waiting)]
        if pending and not (self._corked and timeout == 0):  # a batch flushes at 64 KiB or its end
            for peer in pending:
                self._flush(peer)
            if timeout is None or timeout > 0.01:
                timeout = 0.01
        if len(self._peers) > len(self._ready):
            timeout = self._expire_handshakes(now, timeout)
        try:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return 0
        for fd, mask in events:
            listener = self._listeners.get(fd)
            if listener is not None:
                self._accept(listener)
            else:
                known = self._peers.get(fd)
                if known is not None and mask & select.EPOLLOUT:
                    self._flush(known)
                if known is not None and mask & ~select.EPOLLOUT and fd in self._peers:
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

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
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
            _tune(sock, self._keepalive)
            peer = _Peer(sock, name)
            peer.handshake = H.ServerHandshake(
                peer.stream, secret=self._secret, probe=self._probe,
                max_payload=self._pool.slot_size, announce=self._announce,
                grant=self._grant, timeout=self._handshake_timeout)
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
            self._stats["auth_failures"] += 1
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
            if peer.latest is not None and peer.has_credit():
                slot, generation, address = peer.latest
                peer.latest = None
                self._queue(peer, address)
                peer.held[slot] = generation
                peer.sent += 1
                self._flush(peer)
        elif not peer.ready and ftype != P.BYE:
            assert peer.handshake is not None
            done = peer.handshake.on_frame(ftype, body)
            self._flush(peer)
            if peer.stream.fileno() not in self._peers:
                return
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

    def _grant(self, requested: int) -> int:
        """The credit window given to a subscriber that asked for ``requested`` (0: default)."""
        return min(requested or self._window, self._pool.slots)

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
        if peer.latest is not None:
            self._pool.release(peer.latest[0], peer.latest[1])
            peer.latest = None

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
        self._close_listeners()
        try:
            if self._probe is not None:
                self._probe.close()
        finally:
            self._pool.close()

    def _close_listeners(self) -> None:
        for sock in self._listeners.values():
            sock.close()
        self._listeners.clear()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unix_paths.clear()

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


def _connect(url: str, timeout: Optional[float], keepalive: float = 5.0) -> socket.socket:
    family, address = parse_url(url)
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.01
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            sock.settimeout(left)
            sock.connect(address)
            _tune(sock, keepalive)
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


class Subscriber(_Closes):
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
    window : int, optional
        How many unreleased messages this subscriber may hold (its credit);
        the publisher's default when not given, never more than its slots.
    keepalive : float
        Seconds of silence after which TCP keepalive probes the publisher (0:
        off); a publisher that vanished without closing is reported as
        :class:`Disconnected` about ``2 * keepalive`` seconds later.
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
                 identity: str = "", window: Optional[int] = None,
                 keepalive: float = 5.0, secret: H.SecretLike = None,
                 transport: str = "auto", handshake_timeout: Optional[float] = None) -> None:
        if window is not None and not 0 < window < 2**32:
            raise ValueError("window must be positive")
        if transport not in ("auto", "shm", "inline"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'inline', not {transport!r}")
        secret_bytes = H.resolve_secret(secret)
        self._url = url
        self._closed = True
        self._sock = _connect(url, connect_timeout, keepalive)
        self._stream = Stream(self._sock)
        self._segments: Dict[int, PeerSegment] = {}
        self._version = 0
        self._window = window or 0
        self._flush_at = 16
        self._stats = {"received": 0, "bytes": 0, "inline": 0}
        self._closed = False
        self._gone: Optional[BaseException] = None
        self._said_bye = False
        self._output_broken = False
        self._handshake = H.ClientHandshake(
            self._stream, secret=secret_bytes, transport=transport, identity=identity,
            url=url, timeout=handshake_timeout, window=self._window)
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

    @property
    def said_goodbye(self) -> bool:
        """True when the publisher closed the route cleanly (it sent BYE)."""
        return self._said_bye

    def fileno(self) -> int:
        """The socket's descriptor: readable when a message (or a control frame) arrived."""
        return self._stream.fileno()

    @property
    def window(self) -> int:
        """The credit the publisher granted (0 until the handshake is done)."""
        return self._window if self._version else 0

    def stats(self) -> Dict[str, int]:
        """Counters and state.

        Returns
        -------
        dict
            ``received``, ``bytes``, ``inline`` (messages that came through
            the connection), ``held`` (shared-memory messages not yet released),
            ``window``, ``credit`` (messages the publisher may still send
            before this subscriber releases one), ``pending_output`` (bytes
            of releases not yet sent).
        """
        out = dict(self._stats)
        # Inline messages hold no slot of the publisher's: they are never released to it.
        held = out["received"] - out["inline"] - self._stream.releases_queued
        out.update(held=held, window=self.window, credit=max(self.window - held, 0),
                   pending_output=self._stream.pending if not self._closed else 0)
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
                    if stream.pending >= self._flush_at and not self._output_broken:
                        # Credit goes back in batches, before the window runs dry.
                        try:
                            stream.flush(0)
                        except ConnectionError:
                            self._output_broken = True
                    return msg
                if ftype == P.INLINE:
                    if not self._handshake.inline:
                        raise ProtocolError("INLINE frame on a shared-memory connection")
                    msg = Message._local(body[1], body[0])
                    self._stats["received"] += 1
                    self._stats["inline"] += 1
                    self._stats["bytes"] += msg.nbytes
                    return msg
                self._on_control(ftype, body)
        except (OSError, ValueError, LookupError) as exc:
            raise self._fatal(exc)

    def _fatal(self, exc: BaseException) -> BaseException:
        """Close on an error that ends the connection; return what to raise for it.

        A lost connection is reported as :class:`Disconnected` (caused by the
        system error); protocol errors, stale generations and the rest as
        they are.
        """
        if isinstance(exc, ConnectionError) and not isinstance(exc, Disconnected):
            gone = Disconnected(f"connection to publisher at {self._url} lost: {exc}")
            gone.__cause__ = exc
            exc = gone
        self._shutdown(exc)
        return exc

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
                    wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    left = self._handshake.remaining()
                    if left is not None and (wait is None or left < wait):
                        wait = left
                    if stream.pending:
                        stream.flush(wait)
                    # Always look once, even with no time left (wait_ready(0) polls).
                    if stream.fill(wait) == 0 and deadline is not None \
                            and time.monotonic() >= deadline:
                        break
                elif frame[0] in (P.ADDRESS, P.INLINE):
                    raise ProtocolError(f"{P.FRAME_NAMES[frame[0]]} before the handshake ended")
                else:
                    self._on_control(frame[0], frame[1])
        except (OSError, ValueError, LookupError) as exc:
            raise self._fatal(exc)
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
            hs = self._handshake
            try:
                hs.on_frame(ftype, body)
            finally:
                # The answer, or the ERROR that says why this side gives up.
                try:
                    self._stream.flush(0)
                except OSError:
                    pass
            if hs.version and not self._version:
                self._version = hs.version
                if hs.window:
                    self._window = hs.window
                    self._flush_at = 16 * max(1, hs.window // 2)
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

    def __repr__(self) -> str:
        return f"<fastshm.Subscriber {self._url}{' closed' if self._closed else ''}>"
