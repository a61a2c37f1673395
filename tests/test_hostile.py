"""Hostile peers: thousands of random and crafted frames at a publisher and a subscriber.

Both must survive, keep serving well-behaved peers, and leak no segment, no
descriptor and no slot.  Each hostile connection is counted with the frame
that ends it; the totals are printed (``pytest -s``) and checked against a
floor of 10,000.
"""

from __future__ import annotations

import json
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from typing import Callable, List, Optional, Tuple

import pytest

from fastshm import (
    AuthenticationError, Disconnected, FastShmError, ProtocolError, Publisher, Subscriber,
)
from fastshm import _core
from fastshm import handshake as H
from fastshm import protocol as P
from fastshm.pool import SlotPool
from handshakes import connect
from test_net import last_json, spawn

HEADER = struct.Struct("<HBBI")
MAGIC = 0x5346
RNG_SEED = 20261125


def frame(ftype: int, body: bytes = b"", *, magic: int = MAGIC, version: int = 1,
          length: Optional[int] = None) -> bytes:
    return HEADER.pack(magic, version, ftype, len(body) if length is None else length) + body


def host_port(url: str) -> Tuple[str, int]:
    host, port = url[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def open_fds() -> set:
    """This process's descriptors, as (number, what it points to)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((int(fd), os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass
    return out


def hello(features: int = P.FEATURE_SHM | P.FEATURE_INLINE, lo: int = 1, hi: int = 1,
          window: int = 0, nonce: bytes = b"n" * 16, ident: bytes = b"fuzz") -> bytes:
    return struct.pack("<HHII16sH", lo, hi, features, window, nonce, len(ident)) + ident


def probe_answer(status: int = 0, data: bytes = b"\0" * 32, size: Optional[int] = None,
                 kind: int = H.PROBE_ANSWER) -> bytes:
    if size is None:
        size = len(data) if status == 0 else 0
    return struct.pack("<BBHI", kind, size, 0, status) + data


# --- frames a subscriber might send to a publisher --------------------------------

# Prefixes that bring a connection to a state before its hostile frame.
PUB_PREFIXES = {
    "none": b"",
    "hello": frame(P.HELLO, hello()),
    # INLINE only: the publisher skips the probe and the connection is ready at once.
    "ready-inline": frame(P.HELLO, hello(P.FEATURE_INLINE)),
    # A wrong token: the publisher falls back to inline and the connection is ready.
    "ready-probed": frame(P.HELLO, hello()) + frame(P.PROBE, probe_answer()),
}


def crafted_at_publisher() -> List[Tuple[str, bytes]]:
    """(prefix, hostile bytes): each case ends the connection or is harmless."""
    cases = [
        ("none", frame(P.HELLO, hello(), magic=0x4653)),
        ("none", frame(P.HELLO, hello(), version=2)),
        ("none", frame(P.HELLO, hello(), version=0)),
        ("none", frame(P.HELLO, b"", length=H.PUBLISHER_HANDSHAKE_MAX_BODY + 1)),
        ("none", frame(P.HELLO, b"", length=0xFFFFFFFF)),
        ("none", frame(P.HELLO, hello())[:5]),                         # truncated header
        ("none", frame(P.HELLO, hello())[:20]),                        # truncated body
        ("none", frame(P.HELLO, hello(lo=0, hi=0))),
        ("none", frame(P.HELLO, hello(lo=3, hi=2))),
        ("none", frame(P.HELLO, hello(lo=2, hi=9))),                   # no common version
        ("none", frame(P.HELLO, hello(nonce=b"x" * 16, ident=b"\xff\xfe"))),
        ("none", frame(P.HELLO, hello()[:-1])),                        # identity too short
        ("none", frame(P.HELLO, hello() + b"x")),
        ("none", frame(P.HELLO, hello(features=0))),                   # neither shm nor inline
        ("none", frame(P.AUTH, b"\0" * 32)),
        ("none", frame(P.PROBE, probe_answer())),
        ("none", frame(P.RELEASE, struct.pack("<II", 0, 0))),
        ("none", frame(P.ADDRESS, _core.Address(1, 0, 1).pack())),
        ("none", frame(0, b"")),
        ("none", frame(255, b"x" * 100)),
        ("hello", frame(P.HELLO, hello())),                            # second HELLO
        ("hello", frame(P.AUTH, b"\1" * 32)),                          # AUTH nobody asked for
        ("hello", frame(P.PROBE, probe_answer(size=31, data=b"x" * 31))),
        ("hello", frame(P.PROBE, probe_answer(data=b"x" * 33))),
        ("hello", frame(P.PROBE, probe_answer(status=1, data=b"r" * 256))),
        ("hello", frame(P.PROBE, probe_answer(kind=H.PROBE_OFFER))),
        ("hello", frame(P.PROBE, probe_answer(kind=9))),
        ("hello", frame(P.PROBE, b"\2\0")),
        ("hello", frame(P.PING, b"p")),
        ("ready-inline", frame(P.RELEASE, struct.pack("<IIIIQ", 1, 0, 1, 0, 1))),  # not held
        ("ready-inline", frame(P.RELEASE, struct.pack("<IIIIQ", 5, 0, 1, 0, 1))),  # count lies
        ("ready-inline", frame(P.RELEASE, struct.pack("<II", 0, 7))),              # reserved
        ("ready-inline", frame(P.RELEASE, struct.pack("<II", 0xFFFFFFFF, 0))),
        ("ready-inline", frame(P.RELEASE, b"", length=H.PUBLISHER_MAX_BODY + 1)),
        ("ready-inline", frame(P.RELEASE, b"\0" * 3)),
        ("ready-inline", frame(P.INLINE, _core.Address(1, 0, 0, flags=1).pack())),
        ("ready-inline", frame(P.SEGMENT, b"\0" * 46)),
        ("ready-inline", frame(P.HELLO, hello())),
        ("ready-inline", frame(P.PROBE, probe_answer())),
        ("ready-inline", frame(P.ADDRESS, _core.Address(1, 2**63, 2**63 - 1).pack())),
        ("ready-inline", frame(P.ADDRESS, b"\0" * 8 + struct.pack("<QQ", 2**64 - 8, 16)
                               + b"\0" * 32)),                         # offset+length overflows
        ("ready-inline", frame(P.ERROR, struct.pack("<I", 1) + b"no")),
        ("ready-inline", frame(P.BYE, struct.pack("<I", 0))),
        ("ready-probed", frame(P.RELEASE, struct.pack("<IIIIQ", 1, 0, 99, 3, 1))),
        ("ready-probed", frame(P.PING, b"", length=H.PUBLISHER_MAX_BODY + 1)),
        ("ready-probed", frame(P.PING, b"x" * 100, magic=0)),
    ]
    return cases


def random_at_publisher(rng: random.Random) -> Tuple[str, bytes]:
    prefix = rng.choice(list(PUB_PREFIXES))
    kind = rng.randrange(4)
    if kind == 0:
        return prefix, rng.randbytes(rng.randrange(1, 48))
    if kind == 1:
        body = rng.randbytes(rng.randrange(0, 80))
        return prefix, frame(rng.randrange(256), body,
                             magic=rng.choice([MAGIC, rng.randrange(65536)]),
                             version=rng.choice([1, 1, rng.randrange(256)]),
                             length=rng.choice([None, None, rng.randrange(2**32)]))
    if kind == 2:  # well-formed header, random body, a type the publisher knows
        ftype = rng.choice([P.HELLO, P.AUTH, P.PROBE, P.RELEASE, P.PING, P.BYE, P.CREDIT])
        return prefix, frame(ftype, rng.randbytes(rng.randrange(0, 120)))
    # a mutated valid frame
    good = bytearray(rng.choice([frame(P.HELLO, hello()), frame(P.PROBE, probe_answer()),
                                 frame(P.RELEASE, struct.pack("<IIIIQ", 1, 1, 0, 0, 1))]))
    for _ in range(rng.randrange(1, 4)):
        good[rng.randrange(len(good))] = rng.randrange(256)
    return prefix, bytes(good)


class Server(threading.Thread):
    """Runs a publisher in a thread: it serves, and sends frames to its good subscriber."""

    def __init__(self, pub: Publisher, size: int, count: int) -> None:
        super().__init__(daemon=True)
        from fastshm.demo import expected_frame, pattern
        self.pub, self.size, self.count = pub, size, count
        self.frames = lambda seq: expected_frame(pattern(size), seq, size)
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.sent = 0

    def run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self.stop.is_set():
                self.pub.poll(0.002)
                if self.sent < self.count and self.pub.subscribers and \
                        time.monotonic() >= next_at:
                    self.sent += 1
                    self.pub.send(self.frames(self.sent), timeout=10)
                    next_at = time.monotonic() + 0.004
        except BaseException as exc:  # reported by the test
            self.error = exc


def attack(url: str, cases: List[Tuple[str, bytes]], prefixes, batch: int = 32) -> int:
    """Open one connection per case, send prefix + hostile bytes, wait for the end."""
    family, address = socket.AF_INET, None
    if url.startswith("unix://"):
        family, address = socket.AF_UNIX, url[len("unix://"):]
    else:
        host, port = url[len("tcp://"):].rsplit(":", 1)
        address = (host, int(port))
    done = 0
    for start in range(0, len(cases), batch):
        sel = selectors.DefaultSelector()
        socks = []
        try:
            for prefix, data in cases[start:start + batch]:
                s = socket.socket(family, socket.SOCK_STREAM)
                socks.append(s)
                s.connect(address)
                s.sendall(prefixes[prefix] + data)
                s.shutdown(socket.SHUT_WR)  # the publisher reads EOF after the frames
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            open_ = len(socks)
            deadline = time.monotonic() + 20
            while open_ and time.monotonic() < deadline:
                for key, _ in sel.select(0.5):
                    try:
                        data = key.fileobj.recv(65536)
                    except (ConnectionResetError, BlockingIOError):
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        open_ -= 1
            assert open_ == 0, "the publisher kept hostile connections open"
            done += len(socks)
        finally:
            sel.close()
            for s in socks:
                s.close()
    return done


def slow_loris(url: str, n: int, interval: float, limit: float) -> List[float]:
    """``n`` peers sending a HELLO one byte per ``interval``; seconds until each was dropped."""
    socks = [socket.create_connection(host_port(url)) for _ in range(n)]
    silent = socket.create_connection(host_port(url))  # connects and says nothing
    socks.append(silent)
    data = frame(P.HELLO, hello())
    t0 = time.monotonic()
    ended: List[Optional[float]] = [None] * len(socks)
    try:
        for s in socks:
            s.setblocking(False)
        i = 0
        while any(e is None for e in ended) and time.monotonic() - t0 < limit:
            for k, s in enumerate(socks):
                if ended[k] is not None:
                    continue
                try:
                    if s is not silent and i < len(data):
                        s.send(data[i:i + 1])
                    while True:
                        got = s.recv(4096)
                        if not got:
                            ended[k] = time.monotonic() - t0
                            break
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    ended[k] = time.monotonic() - t0
            i += 1
            time.sleep(interval)
    finally:
        for s in socks:
            s.close()
    return [e if e is not None else float("inf") for e in ended]


def never_reads(url: str, pings: int = 400) -> bool:
    """Finish the handshake inline, then send PINGs and never read a PONG: dropped?"""
    s = socket.create_connection(host_port(url))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.sendall(frame(P.HELLO, hello(P.FEATURE_INLINE)))
        s.settimeout(5)
        ping = frame(P.PING, b"p" * 60000)
        for _ in range(pings):
            s.sendall(ping)
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    finally:
        s.close()


@pytest.fixture
def quiet_logs(caplog):
    caplog.set_level(logging.CRITICAL, logger="fastshm")


def test_publisher_survives_hostile_subscribers(quiet_logs, capsys):
    rng = random.Random(RNG_SEED)
    size, good_count = 65536, 400
    pub = Publisher("tcp://127.0.0.1:0", slot_size=size, slots=8, policy="drop", window=4,
                    handshake_timeout=1.0)
    good = spawn("subscriber", pub.url, "--size", str(size), "--count", str(good_count))
    server = Server(pub, size, good_count)
    try:
        pub.wait_for_subscribers(1, timeout=30)
        assert json.loads(good.stdout.readline()) == {"connected": True}
        fds = open_fds()
        server.start()
        cases = crafted_at_publisher() * 20
        cases += [random_at_publisher(rng) for _ in range(7000)]
        rng.shuffle(cases)
        t0 = time.monotonic()
        thrown = attack(pub.url, cases, PUB_PREFIXES)
        loris = slow_loris(pub.url, 4, 0.25, limit=5.0)
        dropped = never_reads(pub.url)
        elapsed = time.monotonic() - t0
        assert last_json(good, 60) == {"received": good_count, "bad": 0}
        server.stop.set()
        server.join(10)
        assert server.error is None, server.error
        assert server.sent == good_count
        # Everything hostile is gone; the publisher settles back to what it was.
        for _ in range(100):
            pub.poll(0.01)
            if len(pub._peers) == 0:
                break
        assert len(pub._peers) == 0 and pub.subscribers == 0
        # No descriptor appeared (the good subscriber's connection and pipe went away).
        assert open_fds() - fds == set() and len(fds - open_fds()) == 2
        stats = pub.stats()
        assert stats["slots_free"] == 8
        assert stats["protocol_errors"] > len(cases) // 2
        # The handshake deadline is 1 s from accept (which may come just before t0).
        assert all(0.9 <= t < 3.0 for t in loris), loris
        assert dropped, "a peer that never reads its replies was kept"
        with capsys.disabled():
            print(f"\n  publisher: {thrown} hostile connections in {elapsed:.1f} s, "
                  f"{stats['protocol_errors']} refused with a protocol error, "
                  f"slow peers dropped after {max(loris):.2f} s")
        assert thrown >= 7900
    finally:
        server.stop.set()
        if server.is_alive():
            server.join(10)
        if good.poll() is None:
            good.kill()
            good.wait()
        good.stdout.close()
        pub.close()


def test_a_subscriber_that_never_reads_does_not_stall_the_publisher(quiet_logs):
    """An inline subscriber whose socket is full holds its window; the others go on."""
    size = 1 << 20
    with Publisher("tcp://127.0.0.1:0", slot_size=size, slots=8, policy="drop",
                   window=2) as pub:
        stuck = socket.create_connection(host_port(pub.url))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(frame(P.HELLO, hello(P.FEATURE_INLINE, window=2)))
        sub = Subscriber(pub.url, connect_timeout=5, window=4)
        connect(pub, sub, total=2)
        t0 = time.monotonic()
        for seq in range(50):
            assert pub.send(bytes([seq]) * size, timeout=5) >= 1
            with sub.receive(timeout=5) as msg:
                assert bytes(msg) == bytes([seq]) * size
            sub.flush(1)
        assert time.monotonic() - t0 < 10
        peers = {p["identity"]: p for p in pub.stats()["peers"]}
        assert peers["fuzz"]["held"] == 2 and peers["fuzz"]["drops"] >= 40
        assert peers["fuzz"]["sent"] + peers["fuzz"]["drops"] == 50
        stuck.close()
        sub.close()


# --- frames a publisher might send to a subscriber --------------------------------

class FakePublisher:
    """A listening socket that plays a publisher, with a real pool and probe to point at."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pool = SlotPool(4096, 4)
        self.probe = H.Probe()
        for slot in range(4):
            assert self.pool.acquire() is not None  # generation 1 in every slot
        self.info = P.SegmentInfo(1, 4, self.pool.segment.size, self.pool.data_offset,
                                  self.pool.slot_stride, self.pool.slot_size,
                                  self.pool.segment.name)

    def segment(self, **change) -> bytes:
        from dataclasses import replace
        info = replace(self.info, **{k: v for k, v in change.items() if k != "raw_name"})
        body = P.pack_segment(info)
        if "raw_name" in change:
            raw = change["raw_name"]
            body = body[:40] + struct.pack("<H", len(raw)) + raw
        return body

    def address(self, slot: int = 0, offset: Optional[int] = None, length: int = 10,
                generation: int = 1, segment_id: int = 1, flags: int = 0) -> bytes:
        start = self.pool.offset(slot) if offset is None else offset
        return _core.Address(segment_id, start, length, generation, 1, slot=slot,
                             flags=flags).pack()

    def close(self) -> None:
        self.listener.close()
        self.pool.close()
        self.probe.close()


def sub_prefixes(fake: FakePublisher) -> dict:
    pub_hello = frame(P.HELLO, hello(window=4))
    name = fake.probe.name.encode()
    offer = frame(P.PROBE, struct.pack("<BBHI", H.PROBE_OFFER, 32, len(name), 0) + name)
    return {
        "none": b"",
        "hello": pub_hello,
        "offered": pub_hello + offer,
        "ready-inline": pub_hello + frame(P.PROBE, H.pack_result(H.TRANSPORT_INLINE, 4096)),
        "ready-shm": pub_hello + offer + frame(P.PROBE, H.pack_result(H.TRANSPORT_SHM, 4096))
        + frame(P.SEGMENT, fake.segment()),
    }


def offer(name: bytes, size: int = 32) -> bytes:
    return frame(P.PROBE, struct.pack("<BBHI", H.PROBE_OFFER, size, len(name), 0) + name)


def crafted_at_subscriber(fake: FakePublisher) -> List[Tuple[str, bytes]]:
    a = fake.address
    inline_ok = _core.Address(1, 0, 5, flags=1).pack() + b"12345"
    return [
        ("none", frame(P.HELLO, hello(), magic=0x1111)),
        ("none", frame(P.HELLO, hello(), version=7)),
        ("none", frame(P.HELLO, b"", length=H.SUBSCRIBER_HANDSHAKE_MAX_BODY + 1)),
        ("none", frame(P.HELLO, hello(lo=1, hi=2))),                     # not one version
        ("none", frame(P.HELLO, hello(lo=5, hi=5))),
        ("none", frame(P.HELLO, hello(features=P.FEATURE_AUTH))),        # wants a secret
        ("none", frame(P.SEGMENT, fake.segment())),                      # before the handshake
        ("none", frame(P.ADDRESS, a())),
        ("none", frame(P.INLINE, inline_ok)),
        ("none", frame(P.ERROR, struct.pack("<I", P.ERR_AUTH) + b"go away")),
        ("none", frame(P.ERROR, b"\0")),
        ("hello", frame(P.HELLO, hello())),
        ("hello", frame(P.AUTH, b"\0" * 32)),
        ("hello", offer(b"../../etc/passwd")),
        ("hello", offer(b"fastshm.a/b")),
        ("hello", offer(b"/fastshm.x")),
        ("hello", offer(b"..")),
        ("hello", offer(b"psm_12345")),                                  # not a fastshm name
        ("hello", offer(b"fastshm.none-such")),                          # answered: not found
        ("hello", offer(fake.pool.segment.name.encode())),               # not a probe segment
        ("hello", offer(fake.probe.name.encode(), size=16)),
        ("hello", offer(b"fastshm." + b"x" * 300)),
        ("hello", frame(P.PROBE, H.pack_result(H.TRANSPORT_SHM, 4096))),  # shm without proof
        ("hello", frame(P.PROBE, H.pack_result(9, 4096))),
        ("hello", frame(P.PROBE, H.pack_result(H.TRANSPORT_INLINE, 2**40))),
        ("hello", frame(P.PROBE, b"\3")),
        ("offered", offer(fake.probe.name.encode())),                    # offered twice
        ("ready-inline", frame(P.INLINE, _core.Address(1, 0, 1, flags=1).pack() + b"12")),
        ("ready-inline", frame(P.INLINE, _core.Address(1, 0, 2).pack() + b"12")),
        ("ready-inline", frame(P.INLINE, b"", length=4096 + H.ADDRESS_MAX_SIZE + 1)),
        ("ready-inline", frame(P.INLINE, b"\0" * 40)),
        ("ready-inline", frame(P.ADDRESS, a())),                         # no segment inline
        ("ready-inline", frame(P.SEGMENT, fake.segment())),
        ("ready-shm", frame(P.SEGMENT, fake.segment())),                 # announced twice
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, raw_name=b"../x"))),
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, raw_name=b"fastshm.a/b"))),
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, size=1 << 40))),
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, slot_count=10**6))),
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, slot_size=1 << 30))),
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, data_offset=7))),
        ("ready-shm", frame(P.SEGMENT, fake.segment(segment_id=2, name=fake.probe.name,
                                                    size=64))),
        ("ready-shm", frame(P.ADDRESS, a(segment_id=7))),                # unknown segment
        ("ready-shm", frame(P.ADDRESS, a(slot=4))),                      # no such slot
        ("ready-shm", frame(P.ADDRESS, a(slot=0xFFFFFFFF))),
        ("ready-shm", frame(P.ADDRESS, a(offset=0))),                    # the header, not a slot
        ("ready-shm", frame(P.ADDRESS, a(length=4097))),
        ("ready-shm", frame(P.ADDRESS, a(offset=2**63, length=2**63 - 1))),
        ("ready-shm", frame(P.ADDRESS, a(generation=2))),                # stale or forged
        ("ready-shm", frame(P.ADDRESS, b"\0" * 8 + struct.pack("<QQ", 2**64 - 1, 2)
                            + b"\0" * 32)),                              # offset+length overflows
        ("ready-shm", frame(P.INLINE, inline_ok)),                       # inline on shm
        ("ready-shm", frame(P.RELEASE, b"\0" * 8)),
        ("ready-shm", frame(P.PING, b"", length=_core.DEFAULT_MAX_BODY + 1)),
        ("ready-shm", frame(P.BYE, b"")),
    ]


def random_at_subscriber(rng: random.Random, fake: FakePublisher,
                         prefixes: dict) -> Tuple[str, bytes]:
    prefix = rng.choice(list(prefixes))
    kind = rng.randrange(4)
    if kind == 0:
        return prefix, rng.randbytes(rng.randrange(1, 48))
    if kind == 1:
        return prefix, frame(rng.randrange(256), rng.randbytes(rng.randrange(0, 80)),
                             magic=rng.choice([MAGIC, rng.randrange(65536)]),
                             version=rng.choice([1, 1, rng.randrange(256)]),
                             length=rng.choice([None, None, rng.randrange(2**32)]))
    if kind == 2:
        ftype = rng.choice([P.HELLO, P.AUTH, P.PROBE, P.SEGMENT, P.ADDRESS, P.INLINE, P.ERROR])
        return prefix, frame(ftype, rng.randbytes(rng.randrange(0, 120)))
    good = bytearray(rng.choice([
        frame(P.ADDRESS, fake.address(slot=rng.randrange(4))),
        frame(P.SEGMENT, fake.segment(segment_id=2)),
        frame(P.PROBE, H.pack_result(H.TRANSPORT_INLINE, 4096)),
        frame(P.INLINE, _core.Address(1, 0, 5, flags=1).pack() + b"12345"),
    ]))
    for _ in range(rng.randrange(1, 4)):
        good[rng.randrange(len(good))] = rng.randrange(256)
    return prefix, bytes(good)


EXPECTED = (FastShmError, OSError, ValueError, LookupError)


def feed_subscriber(fake: FakePublisher, prefix: bytes, data: bytes) -> str:
    """A real subscriber meets a fake publisher; how did it end?"""
    sub = Subscriber(fake.url, connect_timeout=5, handshake_timeout=2)
    conn, _ = fake.listener.accept()
    try:
        conn.sendall(prefix + data)
        conn.shutdown(socket.SHUT_WR)
        for _ in range(100):
            try:
                msg = sub.receive(timeout=2)
            except EXPECTED as exc:
                assert sub.closed
                return type(exc).__name__
            if msg is not None:
                msg.release()
        return "survived"
    finally:
        sub.close()
        conn.close()


def test_subscriber_survives_hostile_publishers(quiet_logs, capsys):
    rng = random.Random(RNG_SEED + 1)
    fake = FakePublisher()
    try:
        prefixes = sub_prefixes(fake)
        fds = open_fds()
        cases = crafted_at_subscriber(fake) * 10
        cases += [random_at_subscriber(rng, fake, prefixes) for _ in range(3500)]
        outcomes: dict = {}
        t0 = time.monotonic()
        for prefix, data in cases:
            how = feed_subscriber(fake, prefixes[prefix], data)
            outcomes[how] = outcomes.get(how, 0) + 1
        elapsed = time.monotonic() - t0
        # Every hostile publisher ended with a clear error or a clean goodbye.
        assert set(outcomes) <= {"ProtocolError", "AuthenticationError", "Disconnected",
                                 "GenerationError", "FileNotFoundError", "TimeoutError"}, \
            outcomes
        assert outcomes["ProtocolError"] > len(cases) // 2
        assert open_fds() == fds
        # The segments the fake pointed at are mapped by nobody any more.
        assert fake.pool.segment.exports == 0
        with capsys.disabled():
            print(f"\n  subscriber: {len(cases)} hostile publishers in {elapsed:.1f} s: "
                  f"{dict(sorted(outcomes.items()))}")
        # A well-behaved publisher is still served by a new subscriber in this process.
        with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=2) as pub:
            with Subscriber(pub.url, connect_timeout=5) as sub:
                connect(pub, sub)
                pub.send(b"still fine")
                assert bytes(sub.receive(timeout=5)) == b"still fine"
        assert len(cases) >= 4000
    finally:
        fake.close()


def test_slow_publisher_handshake_times_out():
    fake = FakePublisher()
    try:
        sub = Subscriber(fake.url, connect_timeout=5, handshake_timeout=0.5)
        conn, _ = fake.listener.accept()
        try:
            t0 = time.monotonic()
            data = frame(P.HELLO, hello())
            with pytest.raises(TimeoutError, match="handshake"):
                for i in range(len(data)):
                    conn.send(data[i:i + 1])
                    assert sub.receive(timeout=0.1) is None
            assert 0.45 < time.monotonic() - t0 < 1.5
            assert sub.closed
        finally:
            sub.close()
            conn.close()
    finally:
        fake.close()


def read_frames(sock: socket.socket, timeout: float = 5.0) -> List[Tuple[int, bytes]]:
    """Every frame a peer sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    out = []
    while len(data) >= 8:
        _, _, ftype, n = HEADER.unpack_from(data)
        out.append((ftype, data[8:8 + n]))
        data = data[8 + n:]
    return out


def test_no_common_version_is_refused_with_its_code(quiet_logs):
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1) as pub:
        s = socket.create_connection(host_port(pub.url))
        try:
            s.sendall(frame(P.HELLO, hello(lo=2, hi=5)))
            got = []
            t = threading.Thread(target=lambda: got.extend(read_frames(s)))
            t.start()
            while t.is_alive():
                pub.poll(0.01)
            t.join()
        finally:
            s.close()
    [(ftype, body)] = got
    code, text = P.unpack_reason(body)
    assert ftype == P.ERROR and code == P.ERR_VERSION and "2..5" in text and "1..1" in text


def test_connections_in_the_handshake_are_capped_then_expire(quiet_logs):
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1, handshake_timeout=0.5) as pub:
        t_start = time.monotonic()
        idle = [socket.create_connection(host_port(pub.url)) for _ in range(H.MAX_HANDSHAKES)]
        try:
            for _ in range(20):
                pub.poll(0.005)
            assert len(pub._peers) == H.MAX_HANDSHAKES
            extra = socket.create_connection(host_port(pub.url))
            for _ in range(20):
                pub.poll(0.005)
            assert len(pub._peers) == H.MAX_HANDSHAKES
            extra.settimeout(2)
            assert extra.recv(1) == b""  # closed at once, without a word
            extra.close()
            t0 = time.monotonic()
            while pub._peers and time.monotonic() - t0 < 3:
                pub.poll(0.05)
            assert not pub._peers and 0.5 <= time.monotonic() - t_start < 2.5
            # Each got an ERROR saying why.
            ftype, body = read_frames(idle[0])[0]
            assert ftype == P.ERROR and P.unpack_reason(body)[0] == P.ERR_TIMEOUT
            # And a well-behaved subscriber is served right after.
            with Subscriber(pub.url, connect_timeout=5) as sub:
                connect(pub, sub)
                pub.send(b"ok")
                assert bytes(sub.receive(timeout=5)) == b"ok"
        finally:
            for s in idle:
                s.close()
