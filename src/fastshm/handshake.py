"""The handshake of wire protocol v1: versions, authentication, same-host proof.

A connection starts with this exchange (``docs/PROTOCOL.md``, "Handshake")::

    subscriber                                     publisher
    HELLO   versions, features, nonce      ---->
                                           <----   HELLO   version chosen, features, nonce
    AUTH    HMAC over both HELLOs          ---->            (only when the publisher has
                                           <----   AUTH    its own HMAC    a secret)
                                           <----   PROBE   offer: a probe segment's name
    PROBE   answer: the token it holds,    ---->            (only when both sides can use
            or why it could not be read                      shared memory)
                                           <----   PROBE   result: shm or inline
                                           <----   SEGMENT ...                 (shm only)

Same host is decided by proof, never by comparing addresses: a subscriber that
can map the publisher's probe segment read-only and echo the random token in it
shares ``/dev/shm`` with the publisher and receives addresses; any other one
receives INLINE frames carrying the payload.

The classes here drive one side of one connection each.  They queue frames on
a :class:`~fastshm._core.Stream` and never flush or block; the publisher and
subscriber in :mod:`fastshm.net` call them from a few places.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import time
from typing import Any, Callable, Deque, List, Optional, Tuple, Union

from fastshm import _core
from fastshm import protocol as P
from fastshm._core import Address, Segment, Stream
from fastshm.errors import AuthenticationError, ProtocolError

__all__ = [
    "NONCE_SIZE", "MAC_SIZE", "AUTH_LABEL_SUBSCRIBER", "AUTH_LABEL_PUBLISHER",
    "PROBE_MAGIC", "PROBE_SIZE", "PROBE_TOKEN_OFFSET", "PROBE_TOKEN_SIZE",
    "PROBE_OFFER", "PROBE_ANSWER", "PROBE_RESULT", "TRANSPORT_SHM", "TRANSPORT_INLINE",
    "PROBE_OK", "PROBE_NOT_FOUND", "PROBE_DENIED", "PROBE_INVALID", "PROBE_DECLINED",
    "PUBLISHER_HANDSHAKE_MAX_BODY", "SUBSCRIBER_HANDSHAKE_MAX_BODY", "PUBLISHER_MAX_BODY",
    "ADDRESS_MAX_SIZE", "INLINE_MAX_PAYLOAD", "MAX_SEGMENTS", "MAX_HANDSHAKES",
    "MAX_BACKLOG", "DEFAULT_HANDSHAKE_TIMEOUT", "SEGMENT_PREFIX",
    "HandshakeError", "Probe", "ServerHandshake", "ClientHandshake", "InlineQueue",
    "resolve_secret", "check_bind", "mac",
]

#: Random bytes each side puts in its HELLO.
NONCE_SIZE = 16
#: Size of the body of an AUTH frame: one HMAC-SHA256.
MAC_SIZE = 32
#: What each side's HMAC is computed over starts with its role.
AUTH_LABEL_SUBSCRIBER = b"fastshm v1 subscriber\x00"
AUTH_LABEL_PUBLISHER = b"fastshm v1 publisher\x00"

#: The probe segment: magic, 8 reserved bytes, the token, 16 reserved bytes.
PROBE_MAGIC = b"FSPROBE\x00"
PROBE_SIZE = 64
PROBE_TOKEN_OFFSET = 16
PROBE_TOKEN_SIZE = 32

#: The first byte of a PROBE body says which of the three it is.
PROBE_OFFER = 1
PROBE_ANSWER = 2
PROBE_RESULT = 3
#: The transports a PROBE result can choose.
TRANSPORT_SHM = 1
TRANSPORT_INLINE = 2
#: Status of a PROBE answer.
PROBE_OK = 0
PROBE_NOT_FOUND = 1
PROBE_DENIED = 2
PROBE_INVALID = 3
PROBE_DECLINED = 4

#: Largest frame body a publisher accepts before the handshake is done.
PUBLISHER_HANDSHAKE_MAX_BODY = 512
#: Largest frame body a subscriber accepts before the handshake is done.
SUBSCRIBER_HANDSHAKE_MAX_BODY = 2048
#: Largest frame body a publisher accepts afterwards: a full RELEASE frame.
PUBLISHER_MAX_BODY = 8 + _core.RELEASE_MAX_ENTRIES * _core.RELEASE_ENTRY_SIZE
#: Largest packed address: fixed part, longest name, largest metadata.
ADDRESS_MAX_SIZE = _core.ADDRESS_FIXED_SIZE + _core.ADDRESS_MAX_NAME + _core.ADDRESS_MAX_META
#: Largest payload an INLINE frame may carry (a publisher with larger slots
#: serves only subscribers that share its memory).
INLINE_MAX_PAYLOAD = 1 << 30
#: Segments one publisher may announce to a subscriber.
MAX_SEGMENTS = 64
#: Connections a publisher lets sit in the handshake at once.
MAX_HANDSHAKES = 64
#: Unsent control bytes (replies) a publisher keeps for a peer that does not read.
MAX_BACKLOG = 1 << 20
#: Seconds a publisher gives a new connection to finish the handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Every segment a peer may make this process open starts with this.
SEGMENT_PREFIX = "fastshm."

_PROBE_HEAD = struct.Struct("<BBHI")
_PROBE_RESULT = struct.Struct("<BBHIQ")
_MAX_REASON = 255

SecretLike = Union[str, bytes, None]


class HandshakeError(ProtocolError):
    """The handshake failed; ``code`` is the ERROR code to send the peer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- secrets and binding ----------------------------------------------------------

def resolve_secret(secret: SecretLike) -> Optional[bytes]:
    """The shared secret as bytes: the argument, else ``FASTSHM_SECRET``, else None.

    An empty secret counts as none.
    """
    if secret is None:
        secret = os.environ.get("FASTSHM_SECRET") or None
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")
    return bytes(secret) or None


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return False
        return bool(infos) and all(_is_loopback(str(info[4][0])) for info in infos)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_bind(family: int, address: Any, url: str, secret: Optional[bytes],
               insecure: bool) -> None:
    """Refuse to listen on a non-loopback TCP address without a secret.

    Raises
    ------
    ValueError
        Unless the address is loopback, a Unix socket, a secret is set, or
        ``insecure`` is true.
    """
    if family not in (socket.AF_INET, socket.AF_INET6) or secret is not None or insecure:
        return
    if _is_loopback(str(address[0])):
        return
    raise ValueError(
        f"refusing to listen on {url} without a secret: anyone who can reach that address "
        f"could subscribe. Pass secret=... (or set FASTSHM_SECRET) on the publisher and "
        f"its subscribers, listen on 127.0.0.1 or a Unix socket, or pass insecure=True "
        f"if the network is trusted")


def mac(secret: bytes, label: bytes, hello_subscriber: bytes, hello_publisher: bytes) -> bytes:
    """HMAC-SHA256 of ``label`` followed by both HELLO bodies, keyed by ``secret``."""
    return hmac.new(secret, label + hello_subscriber + hello_publisher, hashlib.sha256).digest()


# --- the probe segment --------------------------------------------------------------

class Probe:
    """A small segment holding a random token: whoever can read it shares our ``/dev/shm``.

    Created with the same mode and group as the pool, so a subscriber that
    can read the probe can read the pool.  Its name starts with ``prefix``
    (the channel's, when there is one), so that what reaps the segments of a
    dead publisher reaps its probe too.
    """

    def __init__(self, mode: int = 0o600, group: Optional[int] = None,
                 prefix: str = SEGMENT_PREFIX) -> None:
        self.token = os.urandom(PROBE_TOKEN_SIZE)
        self.segment = Segment.create(PROBE_SIZE, f"{prefix}probe-{os.urandom(12).hex()}",
                                      mode, group=group)
        try:
            self.segment.write(0, PROBE_MAGIC + bytes(PROBE_TOKEN_OFFSET - len(PROBE_MAGIC))
                               + self.token)
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        """The probe segment's name."""
        return self.segment.name

    def offer(self) -> bytes:
        """The body of the PROBE offer naming this segment."""
        name = self.name.encode("ascii")
        return _PROBE_HEAD.pack(PROBE_OFFER, PROBE_TOKEN_SIZE, len(name), 0) + name

    def close(self) -> None:
        """Unmap and unlink the probe segment."""
        try:
            self.segment.close()
        finally:
            self.segment.unlink()


def pack_result(transport: int, max_payload: int) -> bytes:
    """The body of a PROBE result."""
    return _PROBE_RESULT.pack(PROBE_RESULT, transport, 0, 0, max_payload)


def pack_answer(status: int, data: bytes) -> bytes:
    """The body of a PROBE answer: the token (status 0) or a reason."""
    if status == PROBE_OK:
        return _PROBE_HEAD.pack(PROBE_ANSWER, len(data), 0, status) + data
    return _PROBE_HEAD.pack(PROBE_ANSWER, 0, 0, status) + data[:_MAX_REASON]


def _probe_head(body: bytes) -> Tuple[int, int, int, int]:
    if len(body) < _PROBE_HEAD.size:
        raise ProtocolError(f"PROBE of {len(body)} bytes is shorter than {_PROBE_HEAD.size}")
    return _PROBE_HEAD.unpack_from(body)


def check_peer_name(raw: bytes, what: str) -> str:
    """Validate a segment name from the wire: fastshm's prefix, no path tricks.

    Raises
    ------
    ProtocolError
        If it is not a valid name of a fastshm segment.
    """
    try:
        name = _core.check_name(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} names an invalid segment: {exc}") from None
    if not name.startswith(SEGMENT_PREFIX) or raw.startswith(b"/"):
        raise ProtocolError(f"{what} names {name!r}, which is not a fastshm segment")
    return name


def read_probe(name: str) -> Tuple[int, bytes, Optional[OSError]]:
    """Open the probe segment ``name`` read-only: ``(status, token or reason, error)``."""
    try:
        st = os.stat("/dev/shm/" + name)
        if st.st_size != PROBE_SIZE:
            return PROBE_INVALID, f"'{name}' is not a probe segment".encode(), None
    except OSError:
        pass  # shm_open below says what is wrong
    try:
        segment = Segment.open(name, readonly=True)
    except FileNotFoundError as exc:
        return PROBE_NOT_FOUND, b"no such segment here: another host or /dev/shm", exc
    except PermissionError as exc:
        return PROBE_DENIED, b"permission denied", exc
    except OSError as exc:
        return PROBE_INVALID, str(exc).encode("utf-8", "replace"), exc
    try:
        if (segment.size != PROBE_SIZE
                or segment.read(0, len(PROBE_MAGIC)) != PROBE_MAGIC):
            return PROBE_INVALID, f"'{name}' is not a probe segment".encode(), None
        return PROBE_OK, segment.read(PROBE_TOKEN_OFFSET, PROBE_TOKEN_SIZE), None
    finally:
        segment.close()


# --- the publisher's side ------------------------------------------------------------

class ServerHandshake:
    """The publisher's side of one connection's handshake.

    Parameters
    ----------
    stream : Stream
        The connection; replies are queued on it, never flushed here.
    secret : bytes or None
        The shared secret; None serves anyone.
    probe : Probe or None
        The probe segment; None serves every subscriber inline.
    max_payload : int
        The largest payload (the slot size), told to inline subscribers.
    announce : callable
        ``announce(stream)`` queues the SEGMENT frames of a subscriber that
        shares our memory.
    grant : callable
        ``grant(requested)`` is the credit window given to a subscriber that
        asked for ``requested`` messages (0: no preference); it travels in
        the publisher's HELLO.
    timeout : float
        Seconds the peer has to finish, from now.
    """

    def __init__(self, stream: Stream, *, secret: Optional[bytes], probe: Optional[Probe],
                 max_payload: int, announce: Callable[[Stream], None],
                 grant: Callable[[int], int] = lambda requested: requested,
                 timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        self.stream = stream
        self.secret = secret
        self.probe = probe
        self.max_payload = max_payload
        self.announce = announce
        self.grant = grant
        self.deadline = time.monotonic() + timeout
        self.state = "hello"
        self.version = 0
        self.features = 0
        self.identity = ""
        self.window = 0
        self.transport = 0
        self._hello_sub = b""
        self._hello_pub = b""
        stream.max_body = PUBLISHER_HANDSHAKE_MAX_BODY

    @property
    def done(self) -> bool:
        """True once the subscriber may be sent messages."""
        return self.state == "ready"

    @property
    def inline(self) -> bool:
        """True when the subscriber gets INLINE frames."""
        return self.transport == TRANSPORT_INLINE

    def expired(self, now: float) -> bool:
        """True if the handshake is still going at ``now`` past its deadline."""
        return self.state != "ready" and now > self.deadline

    def on_frame(self, ftype: int, body: Any) -> bool:
        """Take one frame from the subscriber; True when the handshake just finished.

        Raises
        ------
        HandshakeError
            With the ERROR code to send (version, protocol).
        AuthenticationError
            If the subscriber's proof of the secret is wrong.
        ProtocolError
            If the frame is malformed or out of turn.
        """
        state = self.state
        if ftype == P.ERROR:
            code, text = P.unpack_reason(body)
            if code == P.ERR_AUTH:
                raise AuthenticationError(f"the subscriber refused this publisher: {text}")
            raise ProtocolError(f"the subscriber gave up the handshake: {text}")
        if ftype == P.HELLO and state == "hello":
            return self._on_hello(body)
        if ftype == P.AUTH and state == "auth":
            return self._on_auth(body)
        if ftype == P.PROBE and state == "probe":
            return self._on_probe(body)
        raise ProtocolError(
            f"unexpected {P.FRAME_NAMES.get(ftype, ftype)} frame in the handshake "
            f"(waiting for {state.upper()})")

    def _on_hello(self, body: bytes) -> bool:
        hello = P.unpack_hello(body)
        if len(body) > P.MAX_IDENTITY + 30:
            raise ProtocolError(f"HELLO identity is longer than {P.MAX_IDENTITY} bytes")
        if hello.max_version < P.MIN_VERSION or hello.min_version > P.MAX_VERSION:
            raise HandshakeError(
                P.ERR_VERSION,
                f"no common protocol version: peer speaks {hello.min_version}.."
                f"{hello.max_version}, this publisher {P.MIN_VERSION}..{P.MAX_VERSION}")
        if len(hello.nonce) != NONCE_SIZE:
            raise ProtocolError("HELLO nonce has the wrong size")
        self.version = min(hello.max_version, P.MAX_VERSION)
        self.features = hello.features
        self.identity = hello.identity
        self.window = self.grant(hello.window)
        features = P.FEATURE_SHM | P.FEATURE_INLINE | (P.FEATURE_AUTH if self.secret else 0)
        self._hello_sub = bytes(body)
        self._hello_pub = P.pack_hello(P.Hello(self.version, self.version, features,
                                               self.window, os.urandom(NONCE_SIZE), ""))
        self.stream.queue(P.HELLO, self._hello_pub)
        if self.secret is not None:
            self.state = "auth"
            return False
        return self._offer()

    def _on_auth(self, body: bytes) -> bool:
        assert self.secret is not None
        expected = mac(self.secret, AUTH_LABEL_SUBSCRIBER, self._hello_sub, self._hello_pub)
        if len(body) != MAC_SIZE or not hmac.compare_digest(bytes(body), expected):
            raise AuthenticationError(
                "the subscriber's proof of the shared secret is wrong: give both sides the "
                "same secret (argument secret=... or FASTSHM_SECRET)")
        self.stream.queue(P.AUTH, mac(self.secret, AUTH_LABEL_PUBLISHER, self._hello_sub,
                                      self._hello_pub))
        return self._offer()

    def _offer(self) -> bool:
        if self.probe is not None and self.features & P.FEATURE_SHM:
            self.stream.queue(P.PROBE, self.probe.offer())
            self.state = "probe"
            return False
        return self._fallback("the subscriber does not map shared memory")

    def _on_probe(self, body: bytes) -> bool:
        kind, size, reserved, status = _probe_head(body)
        rest = bytes(body[_PROBE_HEAD.size:])
        if kind != PROBE_ANSWER or reserved != 0:
            raise ProtocolError("PROBE from a subscriber must be an answer")
        if status == PROBE_OK:
            assert self.probe is not None
            if size != PROBE_TOKEN_SIZE or len(rest) != size:
                raise ProtocolError("PROBE answer carries a token of the wrong size")
            if hmac.compare_digest(rest, self.probe.token):
                return self._finish(TRANSPORT_SHM)
            return self._fallback("the subscriber read another token: another /dev/shm")
        if size != 0 or len(rest) > _MAX_REASON:
            raise ProtocolError("PROBE answer is malformed")
        return self._fallback(
            f"the subscriber cannot map this publisher's memory: "
            f"{rest.decode('utf-8', 'replace') or f'status {status}'}")

    def _fallback(self, why: str) -> bool:
        if not self.features & P.FEATURE_INLINE:
            raise HandshakeError(P.ERR_PROTOCOL,
                                 f"{why}, and it does not accept inline payloads")
        if self.max_payload > INLINE_MAX_PAYLOAD:
            raise HandshakeError(
                P.ERR_LIMIT, f"{why}, and slots of {self.max_payload} bytes are larger than "
                f"an INLINE frame may carry ({INLINE_MAX_PAYLOAD})")
        return self._finish(TRANSPORT_INLINE)

    def _finish(self, transport: int) -> bool:
        self.transport = transport
        self.stream.queue(P.PROBE, pack_result(transport, self.max_payload))
        if transport == TRANSPORT_SHM:
            self.announce(self.stream)
        self.state = "ready"
        self.stream.max_body = PUBLISHER_MAX_BODY
        return True


class InlineQueue:
    """The slots an inline subscriber was queued and has not been sent in full.

    The payload goes out straight from the slot, so the slot stays held until
    the stream has sent its last byte; :meth:`settled` says which slots are
    done with.
    """

    __slots__ = ("stream", "_marks")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._marks: Deque[Tuple[int, int, int]] = collections.deque()

    def queue(self, address: Address, payload: Any, slot: int, generation: int) -> None:
        """Queue an INLINE frame of ``payload`` (a view of ``slot``)."""
        stream = self.stream
        stream.queue_inline(address, payload)
        self._marks.append((stream.bytes_sent + stream.pending, slot, generation))

    @property
    def waiting(self) -> bool:
        """True while some queued payload has not been sent in full (or not settled)."""
        return bool(self._marks)

    def settled(self) -> List[Tuple[int, int]]:
        """``(slot, generation)`` of every payload sent in full since the last call."""
        marks = self._marks
        if not marks:
            return []
        sent = self.stream.bytes_sent
        out = []
        while marks and marks[0][0] <= sent:
            _, slot, generation = marks.popleft()
            out.append((slot, generation))
        return out


# --- the subscriber's side -----------------------------------------------------------

class ClientHandshake:
    """The subscriber's side of the handshake.

    Parameters
    ----------
    stream : Stream
        The connection.
    secret : bytes or None
        The shared secret.  With one, the publisher must prove it knows it too.
    transport : str
        ``"auto"`` (shared memory when the probe proves it possible, inline
        otherwise; a permission problem is an error), ``"shm"`` (shared memory
        or an error) or ``"inline"`` (always inline).
    identity : str
        A name the publisher logs.
    url : str
        The publisher's route, for messages.
    timeout : float, optional
        Seconds the publisher has to finish the handshake; None for no limit.
    window : int
        The credit window asked for (0: the publisher's default).  The one
        granted is :attr:`window` once the publisher's HELLO came.
    """

    def __init__(self, stream: Stream, *, secret: Optional[bytes], transport: str,
                 identity: str, url: str, timeout: Optional[float] = None,
                 window: int = 0) -> None:
        if transport not in ("auto", "shm", "inline"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'inline', not {transport!r}")
        self.stream = stream
        self.secret = secret
        self.want = transport
        self.identity = identity
        self.url = url
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.state = "hello"
        self.version = 0
        self.transport = 0
        self.max_payload = 0
        self.window = window
        self._hello_sub = b""
        self._hello_pub = b""
        self._probed = -1
        stream.max_body = SUBSCRIBER_HANDSHAKE_MAX_BODY

    @property
    def done(self) -> bool:
        """True once the publisher said which transport it uses."""
        return self.state == "ready"

    @property
    def inline(self) -> bool:
        """True when payloads arrive in INLINE frames."""
        return self.transport == TRANSPORT_INLINE

    @property
    def shm(self) -> bool:
        """True when payloads stay in shared memory."""
        return self.transport == TRANSPORT_SHM

    def remaining(self) -> Optional[float]:
        """Seconds left before the handshake deadline (None: no deadline, or done).

        Raises
        ------
        TimeoutError
            Once the deadline passed with the handshake unfinished.
        """
        if self.deadline is None or self.state == "ready":
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"publisher at {self.url} did not finish the handshake in time")
        return left

    def start(self) -> None:
        """Queue the HELLO that opens the connection."""
        features = ((P.FEATURE_SHM if self.want != "inline" else 0)
                    | (P.FEATURE_INLINE if self.want != "shm" else 0)
                    | (P.FEATURE_AUTH if self.secret is not None else 0))
        self._hello_sub = P.pack_hello(P.Hello(
            P.MIN_VERSION, P.MAX_VERSION, features, self.window, os.urandom(NONCE_SIZE),
            self.identity or f"pid {os.getpid()}"))
        self.stream.queue(P.HELLO, self._hello_sub)

    def on_frame(self, ftype: int, body: bytes) -> bool:
        """Take one handshake frame from the publisher; True when it just finished.

        When it fails, an ERROR saying why is queued for the publisher (which
        logs it) before the exception propagates.

        Raises
        ------
        AuthenticationError
            If the two sides do not share the secret.
        PermissionError, FileNotFoundError
            If shared memory was required (or denied by permissions) and the
            probe failed; the message says what to change.
        ProtocolError
            If the frame is malformed or out of turn.
        """
        try:
            return self._on_frame(ftype, body)
        except AuthenticationError as exc:
            self.stream.queue(P.ERROR, P.pack_reason(P.ERR_AUTH, str(exc)))
            raise
        except (ProtocolError, OSError) as exc:
            self.stream.queue(P.ERROR, P.pack_reason(P.ERR_PROTOCOL, str(exc)))
            raise

    def _on_frame(self, ftype: int, body: bytes) -> bool:
        state = self.state
        if ftype == P.HELLO and state == "hello":
            self._on_hello(body)
            return False
        if ftype == P.AUTH and state == "auth":
            expected = mac(self.secret or b"", AUTH_LABEL_PUBLISHER, self._hello_sub,
                           self._hello_pub)
            if len(body) != MAC_SIZE or not hmac.compare_digest(bytes(body), expected):
                raise AuthenticationError(
                    f"publisher at {self.url} did not prove it knows the shared secret")
            self.state = "probe"
            return False
        if ftype == P.PROBE and state == "probe":
            return self._on_probe(body)
        raise ProtocolError(
            f"unexpected {P.FRAME_NAMES.get(ftype, ftype)} frame in the handshake "
            f"(waiting for {state.upper()})")

    def _on_hello(self, body: bytes) -> None:
        hello = P.unpack_hello(body)
        if not P.MIN_VERSION <= hello.min_version == hello.max_version <= P.MAX_VERSION:
            raise ProtocolError(f"publisher chose unsupported version {hello.min_version}"
                                f"..{hello.max_version}")
        if len(hello.nonce) != NONCE_SIZE:
            raise ProtocolError("HELLO nonce has the wrong size")
        self.version = hello.min_version
        self.window = hello.window
        self._hello_pub = bytes(body)
        wants_auth = bool(hello.features & P.FEATURE_AUTH)
        if wants_auth and self.secret is None:
            raise AuthenticationError(
                f"publisher at {self.url} requires a shared secret: pass secret=... or set "
                f"FASTSHM_SECRET")
        if self.secret is not None and not wants_auth:
            raise AuthenticationError(
                f"publisher at {self.url} has no secret, but this subscriber has one: "
                f"refusing a publisher that cannot prove it knows the secret")
        if self.secret is not None:
            self.stream.queue(P.AUTH, mac(self.secret, AUTH_LABEL_SUBSCRIBER, self._hello_sub,
                                          self._hello_pub))
            self.state = "auth"
        else:
            self.state = "probe"

    def _on_probe(self, body: bytes) -> bool:
        kind, size, count, status = _probe_head(body)
        if kind == PROBE_OFFER:
            if self._probed >= 0 or self.want == "inline":
                raise ProtocolError("unexpected PROBE offer")
            raw = bytes(body[_PROBE_HEAD.size:])
            if size != PROBE_TOKEN_SIZE or count != len(raw) or status != 0:
                raise ProtocolError("PROBE offer is malformed")
            name = check_peer_name(raw, "PROBE offer")
            self._probed, data, error = read_probe(name)
            if error is not None and (self.want == "shm" or self._probed == PROBE_DENIED):
                raise type(error)(error.errno, _cannot_map(error, self.url, self.want))
            self.stream.queue(P.PROBE, pack_answer(self._probed, data))
            return False
        if kind != PROBE_RESULT or len(body) != _PROBE_RESULT.size:
            raise ProtocolError("PROBE from a publisher must be an offer or a result")
        _, transport, _, _, max_payload = _PROBE_RESULT.unpack(bytes(body))
        if transport == TRANSPORT_SHM:
            if self._probed != PROBE_OK:
                raise ProtocolError("publisher chose shared memory without a successful probe")
        elif transport == TRANSPORT_INLINE:
            if self.want == "shm":
                raise ProtocolError(
                    f"publisher at {self.url} serves this subscriber inline, but "
                    f"transport='shm' was asked")
            if not 0 <= max_payload <= INLINE_MAX_PAYLOAD:
                raise ProtocolError(f"publisher announced inline payloads of {max_payload} "
                                    f"bytes, more than {INLINE_MAX_PAYLOAD}")
            self.stream.max_inline = ADDRESS_MAX_SIZE + max_payload
        else:
            raise ProtocolError(f"PROBE result names unknown transport {transport}")
        self.transport = transport
        self.max_payload = max_payload
        self.state = "ready"
        self.stream.max_body = _core.DEFAULT_MAX_BODY
        return True


def _cannot_map(error: OSError, url: str, want: str) -> str:
    if isinstance(error, PermissionError):
        return (f"{error.strerror} (to receive the payloads over the connection instead, "
                f"pass transport='inline' to the Subscriber)")
    return (f"cannot map the shared memory of the publisher at {url}: {error.strerror} "
            f"(it runs on another host or with another /dev/shm; transport='auto' receives "
            f"the payloads over the connection instead)")
