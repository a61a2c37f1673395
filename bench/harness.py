"""Two-process benchmark harness.

The benchmark process is the **producer**: it owns the payload, sends it through a
:class:`~bench.systems.base.System` and, in latency mode, waits for a 1-byte ack. A child
process (``multiprocessing`` *spawn* context, started before any timing) is the **consumer**:
it receives every message, checks it (touch: length plus first and last byte; full: every
byte, by an xor fold compared with the expected value) and acks.

Placement: ``cross`` pins producer and consumer to different CPUs, ``same`` pins both to
one CPU, ``none`` leaves both to the scheduler (``os.sched_setaffinity``).

Everything a run creates (child processes, socket files, shared-memory segments) is
recorded in :data:`RESOURCES` and removed by :func:`cleanup_all` even after a failure.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import gc
import importlib
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import numpy as np

KiB = 1024
MiB = 1024 * 1024
#: payload sizes of issue 5: 64 B, 4 KiB, 64 KiB, 1 MiB, one 1080p and one 2160p RGB frame
SIZES = (64, 4 * KiB, 64 * KiB, MiB, 1920 * 1080 * 3, 3840 * 2160 * 3)
SMOKE_SIZES = (64, 64 * KiB)
QUICK_SIZES = (64, 64 * KiB, 1920 * 1080 * 3)

#: consumer modes: latency with touch or full read, streaming with touch
MODES = ("touch", "full")
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- cleanup
class Resources:
    """Everything the harness must remove at the end, whatever happened."""

    def __init__(self) -> None:
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self.paths: set[str] = set()
        self.shm_names: set[str] = set()
        #: /dev/shm entries starting with one of these were made by this process's systems
        self.shm_prefixes: set[str] = set()
        self._workdir: str | None = None
        self._lock = threading.Lock()

    def workdir(self) -> str:
        """A private directory for socket files, removed by :meth:`cleanup`."""
        with self._lock:
            if self._workdir is None:
                self._workdir = tempfile.mkdtemp(prefix="fastshm-bench-")
            return self._workdir

    def cleanup(self) -> list[str]:
        """Kill every child, unlink every file and segment; return what had leaked."""
        leaked: list[str] = []
        for pid, proc in list(self.procs.items()):
            if proc.is_alive():
                leaked.append(f"process {pid}")
                stop_process(proc)
            self.procs.pop(pid, None)
        for path in list(self.paths):
            if os.path.exists(path):
                leaked.append(f"file {path}")
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self.paths.discard(path)
        for name in list(self.shm_names):
            shm_path = "/dev/shm/" + name.lstrip("/")
            if os.path.exists(shm_path):
                leaked.append(f"segment {name}")
                try:
                    os.unlink(shm_path)
                except OSError:
                    pass
            self.shm_names.discard(name)
        try:
            entries = os.listdir("/dev/shm") if self.shm_prefixes else []
        except OSError:
            entries = []
        for entry in entries:
            if any(entry.startswith(p) for p in self.shm_prefixes):
                leaked.append(f"segment {entry}")
                try:
                    os.unlink("/dev/shm/" + entry)
                except OSError:
                    pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return leaked


RESOURCES = Resources()
atexit.register(RESOURCES.cleanup)


def stop_process(proc: multiprocessing.process.BaseProcess, timeout: float = 5.0) -> None:
    """Join ``proc``; terminate, then kill it if it does not exit in time."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)


# --------------------------------------------------------------------------- placement
def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def placement_cpus(placement: str) -> tuple[set[int] | None, set[int] | None]:
    """CPU sets for (producer, consumer) of a placement; ``None`` means not pinned."""
    avail = cpus()
    if placement == "none":
        return None, None
    if placement == "same":
        return {avail[0]}, {avail[0]}
    if placement == "cross":
        if len(avail) < 2:
            raise ValueError("cross-core placement needs two CPUs")
        return {avail[0]}, {avail[1]}
    raise ValueError(f"unknown placement {placement!r}")


def available_placements() -> tuple[str, ...]:
    return ("cross", "same", "none") if len(cpus()) >= 2 else ("same", "none")


class pinned:
    """Context manager pinning the calling thread, restoring its affinity on exit."""

    def __init__(self, cpuset: set[int] | None) -> None:
        self.cpuset = cpuset
        self.saved: set[int] | None = None

    def __enter__(self) -> "pinned":
        if self.cpuset is not None:
            self.saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.cpuset)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            os.sched_setaffinity(0, self.saved)


# --------------------------------------------------------------------------- payload
def pattern(size: int) -> np.ndarray:
    """The deterministic payload: bytes that are not all equal, first and last byte 0."""
    arr = (np.arange(size, dtype=np.uint32) * 131 + 7).astype(np.uint8)
    arr[0] = 0
    arr[-1] = 0
    return arr


def aligned_empty(size: int, align: int = 4096) -> np.ndarray:
    """An uninitialised uint8 array of ``size`` bytes starting on an ``align`` boundary."""
    raw = np.empty(size + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + size]


def xor_fold(view: Any) -> int:
    """Read every byte of ``view``: xor of its 64-bit words, then of the tail bytes."""
    arr = np.frombuffer(view, dtype=np.uint8)
    words = len(arr) // 8
    acc = int(np.bitwise_xor.reduce(arr[: words * 8].view(np.uint64))) if words else 0
    for i, b in enumerate(arr[words * 8 :].tolist()):
        acc ^= b << (8 * i)
    return acc


def expected_fold(base_fold: int, size: int, stamp: int) -> int:
    """xor fold of the pattern after its first and last byte (both 0) were set to ``stamp``."""
    return base_fold ^ stamp ^ (stamp << (8 * ((size - 1) % 8)))


class PayloadRing:
    """``count`` payload buffers, each with ``headroom`` free bytes in front of it.

    ``frames[i]`` is the whole bytearray (headroom and payload), ``views[i]`` the payload.
    A system whose ``send`` returns before the payload was read (zero-copy zmq, the queue's
    feeder thread) gets one buffer per message in flight, so a buffer is only stamped again
    after its message was acked; the others need one.
    """

    def __init__(self, size: int, count: int = 1, headroom: int = 0) -> None:
        base = pattern(size)
        self.size = size
        self.count = count
        self.last = size - 1
        self.frames = [bytearray(headroom + size) for _ in range(count)]
        self.views = [memoryview(f)[headroom:] for f in self.frames]
        for f in self.frames:
            np.frombuffer(f, dtype=np.uint8, offset=headroom)[:] = base

    def stamp(self, seq: int) -> int:
        """Stamp message ``seq`` (its first and last byte) and return its buffer index."""
        i = seq % self.count
        view = self.views[i]
        s = seq & 0xFF
        view[0] = s
        view[self.last] = s
        return i


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class Config:
    """What both sides of one benchmark need to know (picklable)."""

    system: str  # "module:Class"
    size: int
    mode: str  # "touch" | "full"
    kind: str  # "latency" | "stream"
    window: int  # most messages in flight
    ack_every: int  # the consumer acks once per this many messages
    base_fold: int
    workdir: str
    consumer_cpus: set[int] | None = None
    timeout: float = 60.0


def stream_window(size: int) -> int:
    """At most 64 messages or 64 MiB in flight, at least 2."""
    return max(2, min(64, (64 * MiB) // max(size, 1)))


# --------------------------------------------------------------------------- consumer
def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the EOF on the route still ends us
        pass
    if os.getppid() == 1:
        os._exit(3)


def load_system(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def consumer_main(cfg: Config, endpoint: Any) -> None:
    """Body of the consumer process."""
    _die_with_parent()
    if cfg.consumer_cpus is not None:
        os.sched_setaffinity(0, cfg.consumer_cpus)
    gc.disable()  # the loop creates no cycles; a collection would only add noise
    report = os.path.join(cfg.workdir, f"consumer-{os.getpid()}.txt")
    count = [0]
    try:
        cls = load_system(cfg.system)
        rx = cls.Receiver(endpoint, cfg)
        try:
            consume(rx, cfg, count)
        finally:
            rx.close()
        note = f"consumer received {count[0]} messages; end: {getattr(rx, 'end', 'EOF')}\n"
    except BaseException:
        note = f"consumer failed after {count[0]} messages:\n{traceback.format_exc()}"
        with open(report, "w") as f:
            f.write(note)
        raise
    with open(report, "w") as f:
        f.write(note)


def consumer_report(pid: int | None, workdir: str) -> str:
    """What the consumer ``pid`` wrote when it ended ("" if nothing)."""
    try:
        with open(os.path.join(workdir, f"consumer-{pid}.txt")) as f:
            return f.read().strip()
    except OSError:
        return ""


def consume(rx: Any, cfg: Config, counter: list[int] | None = None) -> None:
    """Receive until the producer ends the stream; check every message; ack."""
    size = cfg.size
    last = size - 1
    full = cfg.mode == "full"
    base_fold = cfg.base_fold
    ack_every = cfg.ack_every
    receive, done, ack = rx.receive, rx.done, rx.ack
    count = 0
    pending = 0
    while True:
        view = receive()
        if view is None:
            return
        s = count & 0xFF
        if len(view) != size or view[0] != s or view[last] != s:
            raise AssertionError(
                f"message {count}: length {len(view)}, first {view[0]}, last {view[last]}; "
                f"expected {size}, {s}, {s}"
            )
        if full:
            fold = xor_fold(view)
            if fold != expected_fold(base_fold, size, s):
                raise AssertionError(f"message {count}: payload differs from what was sent")
        done()
        count += 1
        if counter is not None:
            counter[0] = count
        pending += 1
        if pending == ack_every:
            pending = 0
            ack()


# --------------------------------------------------------------------------- producer
class Session:
    """A running producer/consumer pair for one benchmark."""

    def __init__(self, system_cls: type, cfg: Config, producer_cpus: set[int] | None) -> None:
        self.cls = system_cls
        self.cfg = cfg
        self.producer_cpus = producer_cpus
        ring_count = cfg.window if system_cls.deferred else 1
        self.ring = PayloadRing(cfg.size, ring_count, system_cls.headroom)
        self.seq = 0
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.system: Any = None
        self._pin = pinned(producer_cpus)
        self._watchdog: threading.Timer | None = None

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> "Session":
        self._pin.__enter__()
        try:
            self.system = self.cls(self.cfg, self.ring)
            endpoint = self.system.listen()
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(
                target=consumer_main, args=(self.cfg, endpoint), name="bench-consumer", daemon=True
            )
            proc.start()
            self.proc = proc
            RESOURCES.procs[proc.pid] = proc
            self.arm(self.cfg.timeout)
            self.system.accept(self.proc, self.cfg.timeout)
            # one ack's worth of messages proves the pair works, outside any timed region
            self.stream_target(self.cfg.ack_every)()
            self.disarm()
        except BaseException as exc:
            pid = self.proc.pid if self.proc is not None else None
            self.stop()
            note = consumer_report(pid, self.cfg.workdir) if pid is not None else ""
            if note and isinstance(exc, Exception):
                raise RuntimeError(f"{exc!r}; {note}") from exc
            raise
        return self

    def stop(self) -> None:
        """End the stream, wait for the consumer, remove everything; never raises."""
        errors: list[str] = []
        if self.system is not None:
            try:
                self.system.close()
            except Exception as exc:  # keep cleaning up
                errors.append(repr(exc))
        if self.proc is not None:
            stop_process(self.proc)
            RESOURCES.procs.pop(self.proc.pid, None)
            if self.proc.exitcode not in (0, None):
                errors.append(f"consumer exited with {self.proc.exitcode}")
            self.proc.close()
            self.proc = None
        self._pin.__exit__()
        self.disarm()
        self.errors = errors

    def __enter__(self) -> "Session":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pid = self.proc.pid if self.proc is not None else None
        self.stop()
        if exc is not None and pid is not None:
            # say why the consumer went away, not only that it did
            note = consumer_report(pid, self.cfg.workdir)
            if note:
                raise RuntimeError(f"{exc!r}; {note}") from exc

    # watchdog: a hung consumer is killed, which turns a hang into an error -------------
    def arm(self, seconds: float) -> None:
        self.disarm()
        proc = self.proc

        def fire() -> None:
            if proc is not None and proc.is_alive():
                sys.stderr.write(f"bench: consumer hung for {seconds:.0f}s, killing it\n")
                proc.kill()

        self._watchdog = threading.Timer(seconds, fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # operations ------------------------------------------------------------------------
    def latency_target(self) -> Callable[[], None]:
        """A closure doing one ping-pong, with as little overhead as possible."""
        ring_stamp = self.ring.stamp
        send = self.system.send
        wait_ack = self.system.wait_ack
        session = self

        def pingpong() -> None:
            seq = session.seq
            session.seq = seq + 1
            send(ring_stamp(seq))
            wait_ack()

        return pingpong

    def stream_target(self, n: int) -> Callable[[], None]:
        """A closure sending ``n`` messages with at most ``window`` in flight.

        The messages that fit in the window go out inside ``system.batch()`` (a system
        that can write several in one syscall does so there), then it waits for an ack.
        """
        window = self.cfg.window
        ack_every = self.cfg.ack_every
        if n % ack_every:
            raise ValueError("n must be a multiple of ack_every")
        ring_stamp = self.ring.stamp
        send = self.system.send
        wait_ack = self.system.wait_ack
        batch = self.system.batch
        session = self

        def stream() -> None:
            seq = session.seq
            end = seq + n
            acked = seq
            while seq < end:
                stop = min(end, acked + window)
                with batch():
                    while seq < stop:
                        send(ring_stamp(seq))
                        seq += 1
                acked += wait_ack() * ack_every
            while acked < end:
                acked += wait_ack() * ack_every
            session.seq = end

        return stream


def calibrate(fn: Callable[[], None], min_time: float, min_calls: int = 3) -> float:
    """Run ``fn`` for at least ``min_time`` s and ``min_calls`` calls (the warm-up);
    return the median seconds per call of that warm-up."""
    times: list[float] = []
    deadline = time.perf_counter() + min_time
    while len(times) < min_calls or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def iter_systems() -> Iterator[type]:
    from bench.systems import SYSTEMS

    yield from SYSTEMS
