"""Bridge fastshm channels across hosts through Eclipse Zenoh.

On the source host an :class:`Exporter` subscribes to a local fastshm
publisher and puts each message into a Zenoh key expression; on each remote
host an :class:`Importer` subscribes to a key expression (wildcards allowed)
and republishes every key into a local fastshm :class:`~fastshm.Publisher`,
so that the local readers stay zero-copy and use the ordinary
:class:`~fastshm.Subscriber`.  Zenoh does the rest: discovery, routing,
peer or client mode, TLS and user/password authentication, all from a Zenoh
configuration file.

What travels
------------
The payload is the Zenoh sample's payload; the attachment is a fixed
little-endian header followed by the fastshm metadata, as the source sent it
(numpy dtype and shape included)::

    4s magic "FSZ1" | u32 address flags | u64 sequence | u64 timestamp_ns | metadata

Liveliness
----------
An exporter holds the liveliness token ``fastshm/alive/<key>`` while its
local source is connected.  An importer opens the local publisher of a key
when the token appears and closes it when the token goes away (the source
closed, or its host or bridge vanished): the local readers see the end of
the stream, exactly as if the source were on their own host, and reconnect
when it comes back.

Overflow
--------
``policy`` maps fastshm's overflow policy onto Zenoh's congestion control:
``block`` is ``CongestionControl.BLOCK`` (a slow network slows the source
down, which then applies its own policy), ``drop`` and ``latest`` are
``CongestionControl.DROP``.  On the importer it is the local publisher's
policy towards its readers.  ``priority`` is Zenoh's priority.

Zenoh is an optional extra: ``pip install "fastshm[zenoh]"``.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import struct
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from fastshm._core import FLAG_NDARRAY
from fastshm.arrays import unpack_array_meta
from fastshm.errors import Disconnected, FastShmError, Full
from fastshm.net import Publisher, Subscriber

__all__ = [
    "Exporter",
    "Importer",
    "open_session",
    "pack_header",
    "unpack_header",
    "LIVELINESS_PREFIX",
    "add_arguments",
    "run",
]

log = logging.getLogger("fastshm.bridge")

LIVELINESS_PREFIX = "fastshm/alive/"
_HEADER = struct.Struct("<4sIQQ")
_MAGIC = b"FSZ1"
_PRIORITIES = ("real-time", "interactive-high", "interactive-low", "data-high", "data",
               "data-low", "background")


def _zenoh() -> Any:
    try:
        import zenoh  # type: ignore[import-not-found, unused-ignore]  # an optional extra
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the bridge needs Eclipse Zenoh: pip install "fastshm[zenoh]"') from e
    return zenoh


def pack_header(flags: int, seq: int, timestamp_ns: int, meta: bytes) -> bytes:
    """The Zenoh attachment of one message: header and metadata."""
    return _HEADER.pack(_MAGIC, flags, seq, timestamp_ns) + meta


def unpack_header(attachment: bytes) -> Tuple[int, int, int, bytes]:
    """Parse an attachment: ``(flags, seq, timestamp_ns, meta)``.

    Raises
    ------
    ValueError
        If it is not a fastshm bridge attachment.
    """
    if len(attachment) < _HEADER.size or attachment[:4] != _MAGIC:
        raise ValueError("not a fastshm bridge attachment")
    _, flags, seq, stamp = _HEADER.unpack_from(attachment)
    return flags, seq, stamp, attachment[_HEADER.size:]


def open_session(config: Optional[str] = None, *, mode: Optional[str] = None,
                 connect: Sequence[str] = (), listen: Sequence[str] = (),
                 scouting: Optional[bool] = None) -> Any:
    """Open a Zenoh session.

    Parameters
    ----------
    config : str, optional
        A Zenoh configuration file (JSON5): mode, endpoints, TLS, user and
        password authentication, all as Zenoh documents them.
    mode : {"peer", "client", "router"}, optional
        Overrides the file's mode.
    connect, listen : sequence of str
        Zenoh endpoints (``tcp/10.0.0.2:7447``, ``tls/host:7447``) that
        override the file's.
    scouting : bool, optional
        Multicast scouting on or off; by default off when endpoints are
        given, as the file says otherwise.

    Returns
    -------
    zenoh.Session
    """
    zenoh = _zenoh()
    cfg = zenoh.Config.from_file(config) if config else zenoh.Config()
    if mode:
        cfg.insert_json5("mode", f'"{mode}"')
    if connect:
        cfg.insert_json5("connect/endpoints", _json_list(connect))
    if listen:
        cfg.insert_json5("listen/endpoints", _json_list(listen))
    if scouting is None and (connect or listen):
        scouting = False
    if scouting is not None:
        cfg.insert_json5("scouting/multicast/enabled", "true" if scouting else "false")
    return zenoh.open(cfg)


def _json_list(items: Sequence[str]) -> str:
    return "[" + ",".join(f'"{i}"' for i in items) + "]"


def _congestion(policy: str) -> Any:
    zenoh = _zenoh()
    if policy == "block":
        return zenoh.CongestionControl.BLOCK
    if policy in ("drop", "latest"):
        return zenoh.CongestionControl.DROP
    raise ValueError(f"policy must be 'block', 'drop' or 'latest', not {policy!r}")


def _priority(name: str) -> Any:
    if name not in _PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(_PRIORITIES)}, not {name!r}")
    return getattr(_zenoh().Priority, name.upper().replace("-", "_"))


class Exporter:
    """Forward one local fastshm channel into a Zenoh key.

    Parameters
    ----------
    session : zenoh.Session
        From :func:`open_session`.
    url : str
        The local fastshm publisher's route.
    key : str
        The Zenoh key expression to put into (no wildcards).
    policy : {"block", "drop", "latest"}
        Mapped onto Zenoh's congestion control (module docstring).
    priority : str
        Zenoh's priority: ``real-time``, ``interactive-high``,
        ``interactive-low``, ``data-high``, ``data`` (default), ``data-low``
        or ``background``.
    express : bool
        Zenoh's express flag: send at once, without batching.
    secret : str or bytes, optional
        The local publisher's shared secret.
    retry : float
        Seconds between attempts to reach the local publisher.
    """

    def __init__(self, session: Any, url: str, key: str, *, policy: str = "block",
                 priority: str = "data", express: bool = False,
                 secret: Optional[Union[str, bytes]] = None, retry: float = 0.5) -> None:
        if any(c in key for c in "*$"):
            raise ValueError(f"an exported key cannot hold wildcards: {key!r}")
        self.url, self.key, self.secret, self.retry = url, key, secret, retry
        self._session = session
        self._publisher = session.declare_publisher(
            key, congestion_control=_congestion(policy), priority=_priority(priority),
            express=express)
        self.forwarded = 0

    def run(self, stop: threading.Event) -> None:
        """Forward messages until ``stop`` is set, reconnecting to the source."""
        while not stop.is_set():
            try:
                sub = Subscriber(self.url, connect_timeout=self.retry, secret=self.secret)
            except (OSError, FastShmError) as e:
                log.debug("source %s not reachable: %s", self.url, e)
                stop.wait(self.retry)
                continue
            with sub:
                token = None
                try:
                    sub.wait_ready(10)
                    token = self._session.liveliness().declare_token(
                        LIVELINESS_PREFIX + self.key)
                    log.info("source %s is up: exporting to %s", self.url, self.key)
                    self._forward(sub, stop)
                except (Disconnected, OSError) as e:
                    log.info("source %s went away: %s", self.url, e)
                finally:
                    if token is not None:
                        token.undeclare()

    def _forward(self, sub: Subscriber, stop: threading.Event) -> None:
        put = self._publisher.put
        while not stop.is_set():
            msg = sub.receive(timeout=0.2)
            if msg is None:
                if sub.closed:
                    return
                continue
            with msg:
                address = msg.address
                attachment = pack_header(address.flags & FLAG_NDARRAY, msg.seq,
                                         msg.timestamp_ns, address.meta)
                payload = bytes(msg)
            put(payload, attachment=attachment)
            self.forwarded += 1

    def close(self) -> None:
        """Undeclare the Zenoh publisher."""
        self._publisher.undeclare()


@dataclass
class _Channel:
    publisher: Publisher
    received: int = 0
    dropped: int = 0
    sources: int = 0


class Importer:
    """Republish Zenoh keys into local fastshm publishers.

    Parameters
    ----------
    session : zenoh.Session
        From :func:`open_session`.
    key_expr : str
        What to subscribe to; wildcards (``cam/*``, ``cam/**``) allowed.
    url : str
        The local route for each key.  ``{key}`` in it is replaced by the
        key with ``/`` turned into ``.`` (``unix:///run/fastshm/{key}.sock``);
        without it, only the first key seen is republished.
    slot_size, slots : int
        The local publishers' pools; a larger payload is dropped and logged.
    policy : {"block", "drop", "latest"}
        The local publishers' overflow policy towards their readers.
    secret, insecure
        As for :class:`~fastshm.Publisher`.
    send_timeout : float
        How long ``block`` waits for a slow local reader before dropping.
    """

    def __init__(self, session: Any, key_expr: str, url: str, *, slot_size: int,
                 slots: int = 8, policy: str = "block",
                 secret: Optional[Union[str, bytes]] = None, insecure: bool = False,
                 send_timeout: float = 5.0, queue_size: int = 4) -> None:
        self.key_expr, self.url_template = key_expr, url
        self.slot_size, self.slots, self.policy = slot_size, slots, policy
        self.secret, self.insecure, self.send_timeout = secret, insecure, send_timeout
        self.channels: Dict[str, _Channel] = {}
        self._refused: set[str] = set()
        self._events: "queue.Queue[Tuple[str, str, Any, bytes]]" = queue.Queue(queue_size)
        zenoh = _zenoh()
        self._put_kind = zenoh.SampleKind.PUT
        self._subscriber = session.declare_subscriber(key_expr, self._on_sample)
        self._alive = session.liveliness().declare_subscriber(
            LIVELINESS_PREFIX + key_expr, self._on_token, history=True)

    # Zenoh's threads: hand each event to the thread that owns the publishers.
    def _on_sample(self, sample: Any) -> None:
        attachment = sample.attachment
        if sample.kind != self._put_kind or attachment is None:
            return
        event = ("data", str(sample.key_expr), sample.payload.to_bytes(), attachment.to_bytes())
        if self.policy == "block":
            self._events.put(event)  # back-pressure on Zenoh, which blocks the source
            return
        try:
            self._events.put_nowait(event)
        except queue.Full:
            pass  # counted as missing sequence numbers on the readers' side

    def _on_token(self, sample: Any) -> None:
        key = str(sample.key_expr)[len(LIVELINESS_PREFIX):]
        kind = "up" if sample.kind == self._put_kind else "down"
        self._events.put((kind, key, None, b""))

    def url_for(self, key: str) -> str:
        """The local route that key ``key`` is republished on."""
        return self.url_template.replace("{key}", key.replace("/", "."))

    def _open(self, key: str) -> Optional[_Channel]:
        chan = self.channels.get(key)
        if chan is not None:
            return chan
        if "{key}" not in self.url_template and self.channels:
            if key not in self._refused:
                self._refused.add(key)
                log.error("key %s not republished: the route %s has no {key} and serves %s",
                          key, self.url_template, next(iter(self.channels)))
            return None
        pub = Publisher(self.url_for(key), slot_size=self.slot_size, slots=self.slots,
                        policy=self.policy, secret=self.secret, insecure=self.insecure,
                        send_timeout=self.send_timeout)
        log.info("remote source %s is up: republished on %s", key, pub.url)
        chan = self.channels[key] = _Channel(pub)
        return chan

    def _close(self, key: str) -> None:
        chan = self.channels.pop(key, None)
        if chan is not None:
            log.info("remote source %s went away: %s closed", key, chan.publisher.url)
            chan.publisher.close()

    def step(self, timeout: float = 0.05) -> None:
        """Handle the events that arrive within ``timeout`` and serve the local readers."""
        try:
            kind, key, payload, attachment = self._events.get(timeout=timeout)
        except queue.Empty:
            kind = ""
        if kind == "up":
            chan = self._open(key)
            if chan is not None:
                chan.sources += 1
        elif kind == "down":
            chan = self.channels.get(key)
            if chan is not None:
                chan.sources -= 1
                if chan.sources <= 0:
                    self._close(key)
        elif kind == "data":
            chan = self._open(key)
            if chan is not None:
                self._republish(chan, payload, attachment)
        for chan in list(self.channels.values()):
            chan.publisher.poll(0)

    def _republish(self, chan: _Channel, payload: bytes, attachment: bytes) -> None:
        try:
            flags, _seq, _stamp, meta = unpack_header(attachment)
        except ValueError as e:
            log.warning("sample on %s dropped: %s", chan.publisher.url, e)
            chan.dropped += 1
            return
        if len(payload) > self.slot_size:
            log.warning("a %d-byte payload does not fit the %d-byte slots of %s: dropped",
                        len(payload), self.slot_size, chan.publisher.url)
            chan.dropped += 1
            return
        data: Any = payload
        if flags & FLAG_NDARRAY:
            import numpy

            dtype, shape, used = unpack_array_meta(meta)
            data = numpy.frombuffer(payload, dtype=dtype).reshape(shape)
            meta = meta[used:]
        try:
            chan.publisher.send(data, meta=meta)
            chan.received += 1
        except Full:
            chan.dropped += 1

    def run(self, stop: threading.Event) -> None:
        """Republish until ``stop`` is set."""
        while not stop.is_set():
            self.step()

    def close(self) -> None:
        """Undeclare the Zenoh subscribers and close every local publisher."""
        self._alive.undeclare()
        self._subscriber.undeclare()
        for key in list(self.channels):
            self._close(key)


# --- the `fastshm bridge` command ------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastshm bridge`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    exp = sub.add_parser("export", help="forward local fastshm channels into Zenoh keys")
    exp.add_argument("--channel", action="append", required=True, metavar="KEY=URL",
                     help="a Zenoh key and the local publisher's route (repeatable)")
    exp.add_argument("--priority", default="data", choices=_PRIORITIES)
    exp.add_argument("--express", action="store_true", help="Zenoh express: no batching")
    imp = sub.add_parser("import", help="republish Zenoh keys into local fastshm publishers")
    imp.add_argument("--key", required=True, help="Zenoh key expression, wildcards allowed")
    imp.add_argument("--publish", required=True, metavar="URL",
                     help="local route; {key} is replaced by the key with '/' as '.'")
    imp.add_argument("--slot-size", type=int, default=8 << 20)
    imp.add_argument("--slots", type=int, default=8)
    imp.add_argument("--insecure", action="store_true",
                     help="allow a non-loopback TCP route without a secret")
    for p in (exp, imp):
        p.add_argument("--config", help="Zenoh configuration file (JSON5)")
        p.add_argument("--mode", choices=("peer", "client", "router"))
        p.add_argument("--connect", action="append", default=[], metavar="ENDPOINT",
                       help="Zenoh endpoint to connect to, e.g. tcp/10.0.0.2:7447")
        p.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                       help="Zenoh endpoint to listen on")
        p.add_argument("--policy", default="block", choices=("block", "drop", "latest"))
        p.add_argument("--secret", default=None, help="fastshm shared secret (or FASTSHM_SECRET)")


def run(args: argparse.Namespace) -> int:
    """Run ``fastshm bridge export|import`` until SIGINT or SIGTERM."""
    import os

    secret = args.secret or os.environ.get("FASTSHM_SECRET") or None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    session = open_session(args.config, mode=args.mode, connect=args.connect,
                           listen=args.listen)
    try:
        if args.direction == "import":
            importer = Importer(session, args.key, args.publish, slot_size=args.slot_size,
                                slots=args.slots, policy=args.policy, secret=secret,
                                insecure=args.insecure)
            print(f"bridge: importing {args.key} into {args.publish}", flush=True)
            try:
                importer.run(stop)
            finally:
                importer.close()
            return 0
        exporters: List[Exporter] = []
        for spec in args.channel:
            key, sep, url = spec.partition("=")
            if not sep or not key or not url:
                raise SystemExit(f"--channel wants KEY=URL, not {spec!r}")
            exporters.append(Exporter(session, url, key, policy=args.policy,
                                      priority=args.priority, express=args.express,
                                      secret=secret))
        threads = [threading.Thread(target=e.run, args=(stop,), daemon=True) for e in exporters]
        for t in threads:
            t.start()
        print(f"bridge: exporting {', '.join(args.channel)}", flush=True)
        while not stop.is_set() and all(t.is_alive() for t in threads):
            stop.wait(0.2)
        stop.set()
        for t in threads:
            t.join()
        for e in exporters:
            e.close()
        return 0
    finally:
        session.close()
