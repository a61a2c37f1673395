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


# --- INLINE frames: payloads gathered from the caller's buffer ------------------

def inline_address(n, seq=1, meta=b""):
    return Address(1, 4096, n, 3, seq, slot=2, flags=_core.FLAG_INLINE, meta=meta)


def test_inline_frame_is_sent_from_the_buffer_between_queued_frames(pair):
    tx, rx, _, _ = pair
    rx.max_inline = 1 << 20
    payload = bytearray(b"p" * 5000)
    tx.queue(_core.PING, b"a")
    tx.queue_inline(inline_address(5000, meta=b"m"), payload)
    tx.queue_release(1, 0, 1)
    assert tx.pending_buffers == 1
    with pytest.raises(BufferError):
        payload.append(1)  # held by the stream until sent: cannot move
    assert tx.flush(1.0) == 0
    assert tx.pending_buffers == 0
    payload.append(1)
    got = frames(rx)
    assert [f[0] for f in got] == [_core.PING, _core.INLINE, _core.RELEASE]
    address, body = got[1][1]
    assert address == inline_address(5000, meta=b"m")
    assert isinstance(body, bytearray) and body == b"p" * 5000


def test_inline_frames_survive_partial_sends(pair):
    """Many large payloads through a small socket buffer, flushed in pieces."""
    tx, rx, a, _ = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rx.max_inline = 1 << 20
    payloads = [bytes([i]) * (70000 + i) for i in range(20)]
    for i, p in enumerate(payloads):
        tx.queue_inline(inline_address(len(p), seq=i), p)
        tx.queue_release(1, i, i)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 40 and time.monotonic() < deadline:
        tx.flush(0)
        rx.fill(0.01)
        while (f := rx.next_frame()) is not None:
            got.append(f)
    assert tx.pending == 0 and tx.pending_buffers == 0
    inl = [f[1] for f in got if f[0] == _core.INLINE]
    assert [bytes(p) for _, p in inl] == payloads
    assert [a.sequence for a, _ in inl] == list(range(20))
    assert sum(1 for f in got if f[0] == _core.RELEASE) == 20


def test_inline_frames_are_refused_until_the_limit_is_raised(pair):
    tx, rx, _, _ = pair
    tx.queue_inline(inline_address(10), b"0123456789")
    tx.flush(1.0)
    rx.fill(1.0)
    with pytest.raises(ProtocolError, match="INLINE frame of 66 bytes exceeds the limit of 0"):
        rx.next_frame()


@pytest.mark.parametrize("body,match", [
    (b"x" * 10, "shorter than an address"),
    (Address(1, 0, 4, flags=_core.FLAG_INLINE).pack() + b"abc", "carries 3"),
    (Address(1, 0, 3).pack() + b"abc", "lacks FLAG_INLINE"),
    (Address(1, 0, 3, flags=1, meta=b"mm").pack()[:57], "shorter than its address"),
])
def test_bad_inline_frames_raise_protocol_error(pair, body, match):
    _, rx, a, _ = pair
    rx.max_inline = 1000
    a.send(HEADER.pack(0x5346, 1, _core.INLINE, len(body)) + body)
    rx.fill(1.0)
    with pytest.raises(ProtocolError, match=match):
        rx.next_frame()


def test_queue_inline_checks_its_arguments(pair):
    tx, _, _, _ = pair
    with pytest.raises(ValueError, match="FLAG_INLINE"):
        tx.queue_inline(Address(1, 0, 3), b"abc")
    with pytest.raises(ValueError, match="not the payload"):
        tx.queue_inline(inline_address(4), b"abc")
    assert tx.pending == 0 and tx.pending_buffers == 0


def test_close_lets_go_of_held_buffers(pair):
    tx, _, _, _ = pair
    payload = bytearray(100)
    tx.queue_inline(inline_address(100), payload)
    tx.close()
    payload.append(0)  # no export left
    assert tx.pending == 0


def test_large_inline_payloads_are_received_straight_into_their_buffer(pair):
    """Large INLINE frames, cut anywhere, between small frames: all come out whole."""
    tx, rx, a, _ = pair
    rx.max_inline = 1 << 21
    frames_in = []
    wire = b""
    for i, n in enumerate([70000, 1 << 20, 65536, 300000]):
        addr = inline_address(n, seq=i, meta=b"m" * i)
        payload = bytes([i + 1]) * n
        wire += HEADER.pack(0x5346, 1, _core.INLINE, len(addr.pack()) + n) + addr.pack()
        wire += payload
        wire += HEADER.pack(0x5346, 1, _core.PING, 1) + bytes([i])
        frames_in += [(addr, payload), (_core.PING, bytes([i]))]
    got = []
    a.settimeout(10)
    t = threading.Thread(target=a.sendall, args=(wire,))
    t.start()
    deadline = time.monotonic() + 10
    while len(got) < len(frames_in) and time.monotonic() < deadline:
        f = rx.next_frame()
        if f is None:
            rx.fill(0.05)
            continue
        got.append(f)
    t.join()
    assert len(got) == len(frames_in)
    for f, want in zip(got, frames_in):
        if f[0] == _core.INLINE:
            assert f[1][0] == want[0] and isinstance(f[1][1], bytearray)
            assert bytes(f[1][1]) == want[1]
        else:
            assert f == want
    assert rx.buffered == 0


def test_a_large_inline_frame_with_a_bad_address_is_refused_before_its_payload(pair):
    _, rx, a, _ = pair
    rx.max_inline = 1 << 21
    addr = Address(1, 0, 100000, flags=_core.FLAG_INLINE).pack()
    a.sendall(HEADER.pack(0x5346, 1, _core.INLINE, len(addr) + 99999) + addr + b"x" * 10)
    rx.fill(1.0)
    with pytest.raises(ProtocolError, match="carries 99999"):
        rx.next_frame()


def test_close_drops_a_payload_being_received(pair):
    tx, rx, a, _ = pair
    rx.max_inline = 1 << 21
    addr = inline_address(200000)
    a.sendall(HEADER.pack(0x5346, 1, _core.INLINE, len(addr.pack()) + 200000) + addr.pack()
              + b"y" * 1000)
    rx.fill(1.0)
    assert rx.next_frame() is None  # the payload has started
    rx.close()
    assert rx.next_frame() is None
