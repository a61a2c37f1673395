"""fastshm._core.Stream: framing, batching and hostile bytes, over a socketpair."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import pytest

from fastshm import Address, Disconnected, ProtocolError
from fastshm import _core

HEADER = struct.Struct("<HBBI")


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield _core.Stream(a), _core.Stream(b), a, b
    a.close()
    b.close()


def frames(stream, timeout=1.0):
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = stream.next_frame()
        if f is None:
            if out and stream.buffered == 0:
                break
            stream.fill(0.05)
            continue
        out.append(f)
    return out


def test_frames_roundtrip_in_one_send(pair):
    tx, rx, _, _ = pair
    addr = Address(1, 4096, 10, 1, 1)
    tx.queue(_core.PING, b"abc")
    tx.queue_address(addr)
    tx.queue(_core.PONG)
    assert tx.pending == 3 * 8 + 3 + 56
    assert tx.flush() == 0
    assert frames(rx) == [(_core.PING, b"abc"), (_core.ADDRESS, addr), (_core.PONG, b"")]


def test_releases_are_coalesced_into_one_frame(pair):
    tx, rx, _, _ = pair
    for slot in range(5):
        tx.queue_release(1, slot, 10 + slot)
    assert tx.pending == 8 + 8 + 5 * 16
    tx.flush()
    [(ftype, body)] = frames(rx)
    assert ftype == _core.RELEASE
    count, reserved = struct.unpack_from("<II", body)
    assert count == 5 and reserved == 0
    assert list(struct.iter_unpack("<IIQ", body[8:])) == [(1, s, 10 + s) for s in range(5)]


def test_a_frame_after_a_release_ends_the_batch(pair):
    tx, rx, _, _ = pair
    tx.queue_release(1, 0, 1)
    tx.queue(_core.PING, b"")
    tx.queue_release(1, 1, 1)
    tx.flush()
    assert [f[0] for f in frames(rx)] == [_core.RELEASE, _core.PING, _core.RELEASE]


def test_frames_split_across_reads_are_reassembled(pair):
    tx, rx, a, _ = pair
    payload = bytes(range(256)) * 100
    wire = HEADER.pack(0x5346, 1, _core.PING, len(payload)) + payload
    for i in range(0, len(wire), 997):
        a.send(wire[i:i + 997])
        rx.fill(1.0)
    assert rx.next_frame() == (_core.PING, payload)


def test_large_frames_grow_the_buffer_up_to_the_limit(pair):
    tx, rx, _, _ = pair
    rx.max_body = 1 << 20
    body = b"z" * 300000
    tx.queue(_core.PING, body)
    t = threading.Thread(target=tx.flush, args=(5.0,))
    t.start()
    got = frames(rx, 5.0)
    t.join()
    assert got == [(_core.PING, body)]


@pytest.mark.parametrize("raw,match", [
    (HEADER.pack(0x1234, 1, 1, 0), "magic"),
    (HEADER.pack(0x5346, 2, 1, 0), "version"),
    (HEADER.pack(0x5346, 1, 1, 65537), "exceeds"),
    (HEADER.pack(0x5346, 1, _core.ADDRESS, 3) + b"abc", "shorter"),
])
def test_bad_frames_raise_protocol_error(pair, raw, match):
    _, rx, a, _ = pair
    a.send(raw)
    rx.fill(1.0)
    with pytest.raises(ProtocolError, match=match):
        rx.next_frame()


def test_peer_close_is_disconnected(pair):
    _, rx, a, _ = pair
    a.close()
    with pytest.raises(Disconnected):
        rx.fill(1.0)


def test_fill_times_out_with_zero(pair):
    _, rx, _, _ = pair
    t0 = time.monotonic()
    assert rx.fill(0.1) == 0
    assert time.monotonic() - t0 >= 0.09
    assert rx.fill(0) == 0


def test_flush_to_a_closed_peer_is_a_connection_error(pair):
    tx, _, _, b = pair
    b.close()
    tx.queue(_core.PING, b"x" * 1000)
    with pytest.raises(ConnectionError):
        for _ in range(100):
            tx.flush(1.0)
            tx.queue(_core.PING, b"x" * 1000)


def test_flush_with_zero_timeout_leaves_the_rest_queued(pair):
    tx, rx, _, _ = pair
    tx.queue(_core.PING, b"x" * 60000)
    for _ in range(200):
        tx.queue(_core.PING, b"x" * 60000)
        if tx.flush(0):
            break
    assert tx.pending > 0
    while tx.pending:
        rx.fill(0)
        while rx.next_frame():
            pass
        tx.flush(0.01)


def test_blocking_fill_survives_signals(pair):
    """EINTR: a timer signal during a blocking wait neither ends nor breaks it."""
    tx, rx, _, _ = pair
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        t0 = time.monotonic()
        assert rx.fill(0.3) == 0
        assert time.monotonic() - t0 >= 0.29
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(hits) >= 3


def test_signal_handler_exception_interrupts_the_wait(pair):
    _, rx, _, _ = pair

    def boom(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            rx.fill(5.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
