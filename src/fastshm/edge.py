"""Edge-module entrypoints: ``fastshm-writer`` and ``fastshm-reader``.

Both are configured the IoT Edge way, by environment variables (``FASTSHM_*``), with
command-line flags of the same name overriding them (``--slot-size`` for
``FASTSHM_SLOT_SIZE``). The module identity comes from ``IOTEDGE_MODULEID`` and
``IOTEDGE_DEVICEID`` when IoT Edge sets them.

The writer publishes frames from a source (a synthetic test pattern, a raw file or
stdin) at a rate. The reader connects, retrying with a backoff until a writer is
there and again whenever the writer goes away, and reports every frame as one JSON
line (sequence, bytes, checksum, latency) on stdout and, when ``azure-iot-device``
2.x is installed and the IoT Edge environment is present, on an IoT Edge output.

Both stop on SIGTERM or SIGINT: they close their connections, unlink their segments
and exit 0. Every blocking call is bounded by a short timeout, so a stop request is
seen within a fraction of a second and no signal handler ever raises into the
library.

Run ``python -m fastshm.edge writer|reader|shm-size --help``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import queue
import re
import select
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import IO, Any, Callable, Sequence

from ._core import buffers_equal
from .demo import PERIOD, expected_frame, pattern
from .errors import FastShmError, Full
from .net import Publisher, Subscriber
from .pool import segment_size

__all__ = [
    "ReaderConfig",
    "WriterConfig",
    "main",
    "parse_size",
    "reader_main",
    "run_reader",
    "run_writer",
    "shm_size",
    "test_pattern",
    "writer_main",
]

log = logging.getLogger("fastshm.edge")

#: Exit status of a run stopped by a configuration or start-up error.
EXIT_CONFIG = 2

#: Exit status of a reader that could not map the writer's segment
#: ``FASTSHM_EXIT_ON_MAP_FAILURES`` times in a row.
EXIT_NO_MAPPING = 3

#: The longest a blocking call waits before the stop flag is looked at again.
_POLL = 0.2


# --------------------------------------------------------------------------------------
# Configuration


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """Parse a size in bytes: ``6220800``, ``64k``, ``1M``, ``1MiB``, ``2g``.

    Units are binary, as in Docker's ``--shm-size``: ``k`` is 1024 bytes, ``M``
    1024**2, ``G`` 1024**3 (``KiB``, ``KB`` and ``K`` all mean the same).

    Raises
    ------
    ValueError
        The text is not a non-negative size.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (use bytes, or a k/M/G suffix)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def _parse_mode(text: str | int) -> int:
    if isinstance(text, int):
        mode = text
    else:
        mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"not a permission mode: {text!r}")
    return mode


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise ValueError(f"must not be negative: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in values:
            raise ValueError(f"{text!r} is not one of {', '.join(values)}")
        return value

    parse.__name__ = "choice"
    return parse


@dataclass(frozen=True)
class _Option:
    env: str
    flag: str
    parse: Callable[[str], Any]
    default: str | None
    help: str


def _opt(name: str, parse: Callable[[str], Any], default: str | None, help: str) -> _Option:
    return _Option("FASTSHM_" + name, "--" + name.lower().replace("_", "-"), parse, default, help)


_COMMON = [
    _opt("URL", str, "tcp://127.0.0.1:5555", "route: tcp://host:port or unix:///path"),
    _opt("SECRET", str, None, "shared secret of writer and reader (HMAC handshake)"),
    _opt("COUNT", _non_negative(int), "0", "stop after this many frames (0: run until SIGTERM)"),
    _opt("LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info", "log level"),
]

_WRITER = [
    _opt("CHANNEL", str, None, "name part of the segments (default: the module id, else fastshm)"),
    _opt("SLOT_SIZE", parse_size, "1MiB", "bytes per slot: the largest frame (k/M/G suffixes)"),
    _opt("SLOTS", _non_negative(int), "8", "number of slots"),
    _opt("POLICY", _choice("block", "drop", "latest"), "block", "what to do for a reader without credit"),
    _opt("SEND_TIMEOUT", _non_negative(float), "5", "seconds a blocked send waits before the frame is dropped"),
    _opt("MODE", _parse_mode, "0600", "permission bits of the segments, octal"),
    _opt("GROUP", _non_negative(int), None, "group id to give the segments (default: the writer's group)"),
    _opt("SOURCE", str, "pattern", "pattern, file:PATH or stdin"),
    _opt("FRAME_SIZE", parse_size, None, "bytes per frame (default: the slot size)"),
    _opt("RATE", _non_negative(float), "30", "frames per second (0: as fast as the readers take them)"),
    _opt("LOOP", _parse_bool, "0", "file source: start again at the end"),
    _opt("WAIT_SUBSCRIBERS", _non_negative(int), "0", "wait for this many readers before the first frame"),
]

_READER = [
    _opt("OUTPUT", str, "frames", "IoT Edge output for the reports ('' to disable)"),
    _opt("OUTPUT_EVERY", _non_negative(int), "1", "send one of every N reports to the IoT Edge output"),
    _opt("CHECKSUM", _choice("crc32", "none"), "crc32", "checksum of each frame"),
    _opt("VERIFY", _choice("none", "pattern"), "none", "pattern: check each frame against the writer's test pattern"),
    _opt("RETRY_MAX", _non_negative(float), "2", "longest wait between two connection attempts, seconds"),
    _opt("CONNECT_TIMEOUT", _non_negative(float), "5", "seconds one connection attempt may take"),
    _opt("EXIT_ON_MAP_FAILURES", _non_negative(int), "0",
         "exit (status 3) after this many connections in a row could not map the writer's segment (0: never)"),
]

#: The environment variables each entrypoint reads (besides IOTEDGE_*).
WRITER_ENV = frozenset(o.env for o in _COMMON + _WRITER)
READER_ENV = frozenset(o.env for o in _COMMON + _READER)


@dataclass
class _Identity:
    module: str | None
    device: str | None

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> "_Identity":
        return cls(environ.get("IOTEDGE_MODULEID") or None, environ.get("IOTEDGE_DEVICEID") or None)


@dataclass
class WriterConfig:
    """Settings of ``fastshm-writer`` (see the module docstring for their meaning)."""

    url: str = "tcp://127.0.0.1:5555"
    secret: str | None = None
    count: int = 0
    log_level: str = "info"
    channel: str | None = None
    slot_size: int = 1 << 20
    slots: int = 8
    policy: str = "block"
    send_timeout: float = 5.0
    mode: int = 0o600
    group: int | None = None
    source: str = "pattern"
    frame_size: int | None = None
    rate: float = 30.0
    loop: bool = False
    wait_subscribers: int = 0
    module: str | None = None
    device: str | None = None


@dataclass
class ReaderConfig:
    """Settings of ``fastshm-reader`` (see the module docstring for their meaning)."""

    url: str = "tcp://127.0.0.1:5555"
    secret: str | None = None
    count: int = 0
    log_level: str = "info"
    output: str = "frames"
    output_every: int = 1
    checksum: str = "crc32"
    verify: str = "none"
    retry_max: float = 2.0
    connect_timeout: float = 5.0
    exit_on_map_failures: int = 0
    module: str | None = None
    device: str | None = None


def _build_parser(prog: str, options: Sequence[_Option], description: str, environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for o in options:
        raw = environ.get(o.env, o.default)
        parser.add_argument(
            o.flag,
            dest=o.env[len("FASTSHM_"):].lower(),
            type=o.parse,
            # argparse runs `type` on a string default too, so a bad variable is reported
            # like a bad flag.
            default=raw,
            metavar=o.env,
            help=f"{o.help} [env {o.env}; default {o.default if o.default is not None else 'none'}]",
        )
    return parser


class ConfigError(ValueError):
    """A setting of an edge entrypoint is wrong: the message is one line that names it."""


_UNEXPANDED = re.compile(r"\$\{[^}]*\}")


def _check_environment(options: Sequence[_Option], env: dict[str, str]) -> None:
    """Refuse a variable the deployment left as ``${NAME}`` and an empty secret."""
    for o in options:
        value = env.get(o.env)
        if value is None:
            continue
        if _UNEXPANDED.search(value):
            raise ConfigError(f"{o.env} is {value!r}: the deployment did not expand it (define it in .env)")
        if o.env == "FASTSHM_SECRET" and not value.strip():
            raise ConfigError("FASTSHM_SECRET is empty: set a secret, or remove the variable to run without one")


def _parse(kind: type, prog: str, options: Sequence[_Option], description: str, argv: Sequence[str] | None, environ: dict[str, str] | None) -> Any:
    env = dict(os.environ if environ is None else environ)
    _check_environment(options, env)
    parser = _build_parser(prog, options, description, env)
    ns = parser.parse_args(argv)
    ident = _Identity.from_env(env)
    values = {k: v for k, v in vars(ns).items() if v is not None}
    return kind(module=ident.module, device=ident.device, **values)


def writer_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> WriterConfig:
    """Read the writer's settings from ``environ`` (default ``os.environ``) and ``argv``."""
    cfg: WriterConfig = _parse(WriterConfig, "fastshm-writer", _COMMON + _WRITER, "Publish frames through fastshm.", argv, environ)
    if cfg.channel is None:
        cfg.channel = _channel_name(cfg.module) or "fastshm"
    if cfg.frame_size is None:
        cfg.frame_size = cfg.slot_size
    return cfg


def reader_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ReaderConfig:
    """Read the reader's settings from ``environ`` (default ``os.environ``) and ``argv``."""
    cfg: ReaderConfig = _parse(ReaderConfig, "fastshm-reader", _COMMON + _READER, "Receive frames through fastshm and report them as JSON lines.", argv, environ)
    if cfg.output_every == 0:
        cfg.output_every = 1
    return cfg


def _channel_name(text: str | None) -> str | None:
    """A module id made safe for a segment name (letters, digits, ``_`` and ``-``)."""
    if not text:
        return None
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:32] or None


# --------------------------------------------------------------------------------------
# Stopping


class _Stop:
    """A stop request from SIGTERM or SIGINT: a flag, looked at between bounded waits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return False early when a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))
        return False


# --------------------------------------------------------------------------------------
# Sizes


def shm_size(slot_size: int, slots: int) -> tuple[int, int]:
    """Return ``(segment_size, recommended_shm_size)`` for a writer's geometry.

    ``segment_size`` is what the writer's segment takes in ``/dev/shm``
    (:func:`fastshm.segment_size`, on this machine's page size). The recommended
    ``ShmSize`` is twice that (a dead writer's segment until it is reaped, or
    memory a reader still maps after an unlink) plus 1 MiB of headroom, rounded up
    to a whole MiB.
    """
    segment = segment_size(slot_size, slots)
    mib = 1 << 20
    recommended = -(-(2 * segment + mib) // mib) * mib
    return segment, recommended


# --------------------------------------------------------------------------------------
# Sources


def test_pattern(seq: int, size: int) -> bytes:
    """The test-pattern frame the writer sends with sequence number ``seq``.

    It is the demo's frame (:func:`fastshm.demo.expected_frame`): a slice of a
    pattern repeating every 251 bytes that starts at ``seq % 251``, so each frame
    differs from the one before and the reader can check it from its number.
    """
    return bytes(expected_frame(pattern(size), seq, size))


class _PatternSource:
    """Frames of the test pattern, numbered by the sequence the publisher gives them."""

    def __init__(self, size: int) -> None:
        self._base = pattern(size)
        self._size = size

    def frame(self, seq: int) -> memoryview:
        return expected_frame(self._base, seq, self._size)


class _Interrupted(Exception):
    """Raised inside a loan to give the slot back unsent."""


class _StreamSource:
    """Raw frames of ``size`` bytes read from a file or pipe straight into loaned slots.

    No intermediate buffer: each frame is read into the shared-memory slot that
    carries it. Reads wait in slices, so a stop request is seen even while a pipe is
    silent; a slot that cannot be had is waited for (the source is held back rather
    than frames thrown away).
    """

    def __init__(self, stream: IO[bytes], size: int, rewind: bool, name: str) -> None:
        self._stream = stream
        self._size = size
        self._rewind = rewind
        self._name = name

    def send(self, pub: Any, stop: _Stop) -> bool | None:
        """Read and send one frame: True when sent, None at the end, False on a stop."""
        while not stop:
            try:
                with pub.loan(self._size, timeout=_POLL) as slot:
                    filled = self._fill(slot, stop)
                    if filled < self._size:
                        raise _Interrupted(filled)
                return True
            except Full:
                continue  # the readers hold every slot: hold the source back
            except _Interrupted as exc:
                if stop:
                    return False
                filled = exc.args[0]
                if filled:
                    log.warning("%s: dropping a partial frame of %d bytes at the end", self._name, filled)
                if self._rewind and self._stream.seekable() and self._stream.tell() >= self._size:
                    self._stream.seek(0)
                    continue
                if self._rewind:
                    log.error("%s: cannot start again (not seekable, or shorter than one frame)", self._name)
                return None
        return False

    def _fill(self, slot: memoryview, stop: _Stop) -> int:
        filled = 0
        fd = self._stream.fileno()
        while filled < self._size:
            ready, _, _ = select.select([fd], [], [], _POLL)
            if stop:
                break
            if not ready:
                continue
            with slot[filled:] as part:
                n = self._stream.readinto(part)  # type: ignore[attr-defined]
            if not n:
                break
            filled += n
        return filled


# --------------------------------------------------------------------------------------
# Writer


def _accepts(cls: Any, name: str) -> bool:
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def run_writer(cfg: WriterConfig, stop: _Stop | None = None) -> int:
    """Publish frames until the source ends, ``cfg.count`` frames, or a stop request.

    Returns the exit status: 0 after a clean stop, 2 when the writer cannot start.
    """
    own_stop = stop is None
    stop = stop or _Stop().install()
    try:
        frame_size = cfg.frame_size or cfg.slot_size
        if frame_size > cfg.slot_size:
            log.error("FASTSHM_FRAME_SIZE (%d) is larger than FASTSHM_SLOT_SIZE (%d)", frame_size, cfg.slot_size)
            return EXIT_CONFIG
        close_source: Callable[[], None] = lambda: None
        source: _PatternSource | _StreamSource
        try:
            if cfg.source == "pattern":
                source = _PatternSource(frame_size)
            else:
                if cfg.source in ("stdin", "-"):
                    # Unbuffered: one read() per call, so a silent pipe never blocks a stop.
                    f = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
                    name = "stdin"
                else:
                    name = cfg.source[len("file:"):] if cfg.source.startswith("file:") else cfg.source
                    f = open(name, "rb", buffering=0)
                close_source = f.close
                source = _StreamSource(f, frame_size, cfg.loop, name)
        except OSError as exc:
            log.error("cannot open the source %r: %s", cfg.source, exc)
            return EXIT_CONFIG
        try:
            try:
                pub = Publisher(cfg.url, **_publisher_kwargs(cfg, Publisher))
            except (OSError, ValueError) as exc:
                log.error("cannot start the writer on %s: %s", cfg.url, exc)
                return EXIT_CONFIG
            with pub:
                log.info(
                    "listening on %s: %d slots of %d bytes in %s, source %s, %s frames/s",
                    pub.url, cfg.slots, cfg.slot_size, getattr(pub, "segment_name", "?"),
                    cfg.source, cfg.rate or "max",
                )
                if not cfg.wait_subscribers or _wait_for_subscribers(pub, cfg.wait_subscribers, stop):
                    _publish(pub, cfg, stop, source)
                    if not stop:
                        _drain(pub, stop)
            log.info("writer stopped")
            return 0
        finally:
            close_source()
    finally:
        if own_stop:
            stop.restore()


def _publisher_kwargs(cfg: WriterConfig, publisher: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "slot_size": cfg.slot_size,
        "slots": cfg.slots,
        "channel": cfg.channel,
        "mode": cfg.mode,
    }
    if cfg.group is not None:
        kwargs["group"] = cfg.group
    optional = {"policy": (cfg.policy, "block"), "secret": (cfg.secret, None)}
    for name, (value, plain) in optional.items():
        if value in (plain, None, ""):
            continue
        if _accepts(publisher, name):
            kwargs[name] = value
        else:
            log.warning("this fastshm has no %r option yet: FASTSHM_%s=%r is ignored", name, name.upper(), value)
    return kwargs


def _wait_for_subscribers(pub: Any, n: int, stop: _Stop) -> bool:
    log.info("waiting for %d reader(s)", n)
    while not stop:
        try:
            pub.wait_for_subscribers(n, timeout=_POLL)
            return True
        except TimeoutError:
            continue
    return False


def _publish(pub: Any, cfg: WriterConfig, stop: _Stop, source: _PatternSource | _StreamSource) -> None:
    interval = 1.0 / cfg.rate if cfg.rate > 0 else 0.0
    next_at = time.monotonic()
    stats_at = next_at + 10.0
    sent = dropped = 0
    while not stop:
        if isinstance(source, _PatternSource):
            # The publisher numbers messages 1, 2, ... in the order they are sent: the
            # frame for the next one is the pattern's frame of that number.
            ok: bool | None = _send(pub, source.frame(sent + 1), cfg.send_timeout, stop)
        else:
            ok = source.send(pub, stop)
            if ok is None:
                log.info("end of the source")
                break
        if ok:
            sent += 1
        elif stop:
            break
        else:
            dropped += 1
        if cfg.count and sent + dropped >= cfg.count:
            break
        now = time.monotonic()
        if now >= stats_at:
            log.info("sent %d frames, dropped %d, %d reader(s)", sent, dropped, getattr(pub, "subscribers", -1))
            stats_at = now + 10.0
        if interval:
            next_at += interval
            if next_at > now:
                if not stop.sleep(next_at - now):
                    break
            else:
                next_at = now  # running late: do not catch up in a burst
    log.info("sent %d frames, dropped %d", sent, dropped)


def _drain(pub: Any, stop: _Stop, timeout: float = 5.0) -> None:
    """After the last frame, wait (a while) until the readers gave every slot back.

    Closing unlinks the segment: a reader that has not mapped it yet could not
    read the last frames any more.
    """
    deadline = time.monotonic() + timeout
    while not stop and time.monotonic() < deadline:
        if pub.stats().get("slots_held", 0) == 0:
            return
        pub.poll(_POLL / 4)


def _send(pub: Any, frame: memoryview, timeout: float, stop: _Stop) -> bool:
    """Send one frame, waiting for a free slot at most ``timeout`` seconds.

    The wait is cut into slices of ``_POLL`` so that a stop request is seen.
    Returns False when the frame was not sent (no free slot, or a stop request).
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            pub.send(frame, timeout=max(0.0, min(left, _POLL)))
            return True
        except Full:
            if stop or left <= _POLL:
                return False


# --------------------------------------------------------------------------------------
# Reader


class _EdgeOutput:
    """Reports sent to an IoT Edge output by a worker thread, never blocking the reader.

    The worker connects to the IoT Edge hub, retrying with a backoff while the hub is
    not up yet, then sends the reports. While it cannot send, reports queue up to a
    bound and then the oldest are dropped: the frames keep flowing.
    """

    def __init__(self, connect: Callable[[], Any], message_type: Any, output: str,
                 maxsize: int = 256, retry_max: float = 30.0) -> None:
        self._connect = connect
        self._client: Any = None
        self._message = message_type
        self._output = output
        self._retry_max = retry_max
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize)
        self._closing = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="fastshm-edge-output", daemon=True)
        self._thread.start()

    @staticmethod
    def in_iot_edge(environ: dict[str, str]) -> bool:
        """True when the variables IoT Edge gives its modules are there."""
        if environ.get("EdgeHubConnectionString"):
            return True
        return all(environ.get(k) for k in ("IOTEDGE_WORKLOADURI", "IOTEDGE_MODULEID", "IOTEDGE_DEVICEID"))

    @classmethod
    def create(cls, output: str, environ: dict[str, str]) -> "_EdgeOutput | None":
        """An output when it is asked for, IoT Edge runs this module and the SDK is there."""
        if not output:
            return None
        if not cls.in_iot_edge(environ):
            log.debug("no IoT Edge environment: reporting to stdout only")
            return None
        try:
            from azure.iot.device import IoTHubModuleClient, Message  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            log.warning("azure-iot-device is not installed (pip install 'fastshm[iotedge]'): reporting to stdout only")
            return None

        def connect() -> Any:
            client = IoTHubModuleClient.create_from_edge_environment()
            try:
                client.connect()
            except BaseException:
                client.shutdown()
                raise
            return client

        return cls(connect, Message, output)

    def put(self, line: str) -> None:
        """Queue a report; the oldest goes when the queue is full."""
        while True:
            try:
                self._queue.put_nowait(line)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        delay = 0.5
        quiet = _QuietLog()
        while self._client is None:
            try:
                self._client = self._connect()
            except Exception as exc:  # the SDK raises many unrelated types
                if self._closing.is_set():
                    log.warning("could not connect to the IoT Edge hub (%s): %d report(s) not sent",
                                exc, self._queue.qsize())
                    return
                quiet(logging.WARNING, f"cannot connect to the IoT Edge hub yet ({exc}): retrying")
                self._closing.wait(delay)  # close() cuts the wait short, for a last attempt
                delay = min(delay * 2, self._retry_max)
        log.info("reporting to IoT Edge output %r", self._output)
        while True:
            line = self._queue.get()
            if line is None:
                return
            try:
                msg = self._message(line, content_encoding="utf-8", content_type="application/json")
                self._client.send_message_to_output(msg, self._output)
            except Exception as exc:
                self.dropped += 1
                log.warning("IoT Edge output %r: %s", self._output, exc)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds) and disconnect."""
        self._closing.set()
        try:
            self._queue.put(None, timeout=timeout / 4)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._client is not None:
            try:
                self._client.shutdown()
            except Exception as exc:
                log.debug("IoT Edge client shutdown: %s", exc)


class _Reporter:
    """Turns a message into a JSON line for stdout and, one in N, the IoT Edge output."""

    def __init__(self, cfg: ReaderConfig, out: IO[str], edge: _EdgeOutput | None) -> None:
        self._cfg = cfg
        self._out = out
        self._edge = edge
        self._n = 0
        self._base: bytes | None = None
        self._extra: dict[str, str] = {}
        if cfg.module:
            self._extra["module"] = cfg.module
        if cfg.device:
            self._extra["device"] = cfg.device

    def report(self, msg: Any) -> None:
        now = time.time_ns()
        record: dict[str, Any] = {"seq": msg.seq, "bytes": msg.nbytes}
        if self._cfg.checksum == "crc32":
            record["checksum"] = "crc32:%08x" % zlib.crc32(msg)
        stamp = msg.timestamp_ns
        record["latency_ms"] = round((now - stamp) / 1e6, 3) if stamp else None
        record["transport"] = "inline" if getattr(msg, "inline", False) else "shm"
        if self._cfg.verify == "pattern":
            record["valid"] = self._matches_pattern(msg)
        record.update(self._extra)
        line = json.dumps(record)
        self._out.write(line + "\n")
        self._out.flush()
        if self._edge is not None and self._n % self._cfg.output_every == 0:
            self._edge.put(line)
        self._n += 1

    def _matches_pattern(self, msg: Any) -> bool:
        size = msg.nbytes
        if self._base is None or len(self._base) < size + PERIOD:
            self._base = pattern(size)
        return bool(buffers_equal(msg, expected_frame(self._base, msg.seq, size)))


class _Backoff:
    """Delays that double from ``first`` up to ``largest``."""

    def __init__(self, first: float, largest: float) -> None:
        self.first = first
        self.largest = max(largest, first)
        self.delay = first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.largest)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class _QuietLog:
    """Logs a message at ``level`` the first time, at DEBUG while it repeats."""

    def __init__(self) -> None:
        self._last: str | None = None

    def __call__(self, level: int, text: str) -> None:
        log.log(level if text != self._last else logging.DEBUG, text)
        self._last = text

    def reset(self) -> None:
        self._last = None


def run_reader(cfg: ReaderConfig, stop: _Stop | None = None, out: IO[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Receive and report frames until ``cfg.count`` frames or a stop request.

    Connects with a backoff (up to ``cfg.retry_max`` seconds between attempts) until a
    writer answers, and again each time the writer goes away. Returns the exit
    status: 0 after a clean stop.
    """
    own_stop = stop is None
    stop = stop or _Stop().install()
    out = out or sys.stdout
    edge = _EdgeOutput.create(cfg.output, dict(os.environ if environ is None else environ))
    reporter = _Reporter(cfg, out, edge)
    received = 0
    quiet = _QuietLog()
    try:
        backoff = _Backoff(0.05, cfg.retry_max)
        map_failures = 0
        while not stop:
            sub = _connect(cfg)
            if isinstance(sub, BaseException):
                quiet(logging.INFO, f"waiting for a writer on {cfg.url}")
                log.debug("connecting to %s: %s", cfg.url, sub)
                stop.sleep(backoff.next())
                continue
            mapped = False
            try:
                with sub:
                    _wait_ready(sub, stop)
                    if stop:
                        break
                    mapped = True
                    map_failures = 0
                    quiet.reset()
                    backoff.reset()
                    log.info("connected to %s", cfg.url)
                    while not stop:
                        msg = sub.receive(timeout=_POLL)
                        if msg is None:
                            continue
                        with msg:
                            reporter.report(msg)
                        received += 1
                        if cfg.count and received >= cfg.count:
                            return 0
            except (ConnectionError, FastShmError, OSError) as exc:
                if stop:
                    break
                if mapped:
                    # The writer went away (stopped, restarted, crashed): connect again.
                    quiet(logging.INFO, f"lost the writer on {cfg.url} ({exc}): reconnecting")
                    continue
                # The writer's segment cannot be mapped here: no shared /dev/shm (a
                # re-created writer container has a new one), its mode and group do
                # not admit this user, or the writer closed just then.
                map_failures += 1
                quiet(logging.ERROR, f"cannot map the segment of the writer on {cfg.url}: {exc}")
                if cfg.exit_on_map_failures and map_failures >= cfg.exit_on_map_failures:
                    log.error("could not map the writer's segment %d times in a row: exiting so that "
                              "the container is restarted and joins the writer's /dev/shm again",
                              map_failures)
                    return EXIT_NO_MAPPING
                stop.sleep(backoff.next())
        return 0
    except BrokenPipeError:
        # stdout went away (`fastshm-reader | head`): nothing left to report to.
        _silence_stdout()
        return 0
    finally:
        if edge is not None:
            edge.close()
        if own_stop:
            stop.restore()
        log.info("reader stopped after %d frames", received)


def _connect(cfg: ReaderConfig) -> Any:
    """A new Subscriber, or the exception that says why there is none yet."""
    kwargs: dict[str, Any] = {"connect_timeout": min(cfg.connect_timeout, _POLL)}
    if _accepts(Subscriber, "identity"):
        kwargs["identity"] = cfg.module or "fastshm-reader"
    if cfg.secret:
        if _accepts(Subscriber, "secret"):
            kwargs["secret"] = cfg.secret
        else:
            log.debug("this fastshm has no 'secret' option yet: FASTSHM_SECRET is ignored")
    try:
        return Subscriber(cfg.url, **kwargs)
    except (OSError, FastShmError) as exc:
        return exc


def _wait_ready(sub: Any, stop: _Stop) -> None:
    """Finish the handshake (map the writer's segment) in slices, watching for a stop."""
    wait_ready = getattr(sub, "wait_ready", None)
    if wait_ready is None:
        return
    while not stop:
        try:
            wait_ready(timeout=_POLL)
            return
        except TimeoutError:
            continue


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# --------------------------------------------------------------------------------------
# Command line


def _setup_logging(level: str, name: str | None) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s {name or 'fastshm'} %(levelname)s %(message)s",
    )


def _config_error(prog: str, exc: ConfigError) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def writer_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``fastshm-writer``."""
    try:
        cfg = writer_config(argv)
    except ConfigError as exc:
        return _config_error("fastshm-writer", exc)
    _setup_logging(cfg.log_level, cfg.module or "fastshm-writer")
    return run_writer(cfg)


def reader_main(argv: Sequence[str] | None = None) -> int:
    """Console script ``fastshm-reader``."""
    try:
        cfg = reader_config(argv)
    except ConfigError as exc:
        return _config_error("fastshm-reader", exc)
    _setup_logging(cfg.log_level, cfg.module or "fastshm-reader")
    return run_reader(cfg)


def shm_size_main(argv: Sequence[str] | None = None) -> int:
    """Print the segment size of a writer and the ShmSize to give its container."""
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m fastshm.edge shm-size", description=shm_size_main.__doc__)
    parser.add_argument("--slot-size", type=parse_size, default=env.get("FASTSHM_SLOT_SIZE", "1MiB"), help="bytes per slot [env FASTSHM_SLOT_SIZE]")
    parser.add_argument("--slots", type=_non_negative(int), default=env.get("FASTSHM_SLOTS", "8"), help="number of slots [env FASTSHM_SLOTS]")
    ns = parser.parse_args(argv)
    segment, recommended = shm_size(ns.slot_size, ns.slots)
    print(json.dumps({"slot_size": ns.slot_size, "slots": ns.slots, "segment_size": segment, "ShmSize": recommended}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastshm.edge writer|reader|shm-size [flags]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Callable[[Sequence[str]], int]] = {
        "writer": writer_main, "reader": reader_main, "shm-size": shm_size_main,
    }
    if not args or args[0] not in commands:
        print("usage: python -m fastshm.edge {writer,reader,shm-size} [flags]  (--help for each)", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else EXIT_CONFIG
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
