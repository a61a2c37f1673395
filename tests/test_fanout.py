"""Fan-out, credits and overflow policies, loans: one publisher, many subscribers."""

from __future__ import annotations

import json
import time

import pytest

from fastshm import Full, Publisher, Subscriber
from fastshm.demo import expected_frame, pattern
from handshakes import connect

from test_net import last_json, spawn

SIZE = 1 << 20


def start_subscribers(pub: Publisher, urls, count: int, size: int = SIZE, extra=()):
    procs = [spawn("subscriber", url, "--size", str(size), "--count", str(count), *extra)
             for url in urls]
    pub.wait_for_subscribers(len(procs), timeout=30)
    for proc in procs:
        assert json.loads(proc.stdout.readline()) == {"connected": True}
    return procs


def test_four_subscribers_tcp_and_unix_verify_every_byte_of_500_frames(tmp_path):
    with Publisher(["tcp://127.0.0.1:0", f"unix://{tmp_path}/fan.sock"],
                   slot_size=SIZE, slots=8) as pub:
        tcp, unix = pub.urls
        procs = start_subscribers(pub, [tcp, unix, tcp, unix], 500)
        base = pattern(SIZE)
        for seq in range(1, 501):
            assert pub.send(expected_frame(base, seq, SIZE), timeout=30) == 4
        for proc in procs:
            assert last_json(proc) == {"received": 500, "bad": 0}
        stats = pub.stats()
        assert stats["sent"] == 500 and stats["drops"] == 0
        assert [p["sent"] for p in stats["peers"]] == [500] * 4


def stalled_setup(pub: Publisher, fast: int = 2, count: int = 300):
    # Fast subscribers ask for a window as large as the pool: they never run out of
    # credit, so every message reaches them whatever the stalled one does.
    procs = start_subscribers(pub, [pub.url] * fast, count, extra=("--window", "8"))
    stalled = Subscriber(pub.url, connect_timeout=5, identity="stalled")
    connect(pub, stalled, total=fast + 1, timeout=10)
    return procs, stalled


@pytest.mark.parametrize("policy", ["drop", "latest"])
def test_a_stalled_subscriber_does_not_slow_the_others(policy):
    count = 300
    with Publisher("tcp://127.0.0.1:0", slot_size=SIZE, slots=8, policy=policy) as pub:
        procs, stalled = stalled_setup(pub, count=count)
        assert stalled.window == 4
        base = pattern(SIZE)
        for seq in range(1, count + 1):
            pub.send(expected_frame(base, seq, SIZE), timeout=30)  # never Full
        for proc in procs:
            assert last_json(proc) == {"received": count, "bad": 0}
        stuck = [p for p in pub.stats()["peers"] if p["identity"] == "stalled"][0]
        assert stuck["held"] == 4 and stuck["credit"] == 0
        kept = 4 + (1 if policy == "latest" else 0)
        assert stuck["drops"] == count - kept == pub.stats()["drops"]
        got = []
        deadline = time.monotonic() + 10
        last = count if policy == "latest" else 4
        while time.monotonic() < deadline and (not got or got[-1] != last):
            msg = stalled.receive(timeout=0.05)
            if msg is None:
                pub.poll(0.05)  # the publisher takes the releases and sends what waits
                continue
            assert msg.nbytes == SIZE
            got.append(msg.seq)
            msg.release()
        assert stalled.receive(timeout=0.2) is None
        if policy == "drop":
            assert got[:4] == [1, 2, 3, 4] and got[4:] == []
        else:
            assert got == [1, 2, 3, 4, count]  # the newest replaced every other waiting one
        stalled.close()


def test_block_policy_raises_full_after_its_timeout_with_a_stalled_subscriber():
    with Publisher("tcp://127.0.0.1:0", slot_size=SIZE, slots=8, policy="block",
                   window=3) as pub:
        stalled = Subscriber(pub.url, connect_timeout=5, identity="stalled")
        connect(pub, stalled)
        for _ in range(3):
            pub.send(b"x", timeout=1)
        t0 = time.monotonic()
        with pytest.raises(Full, match="stalled"):
            pub.send(b"x", timeout=0.3)
        assert time.monotonic() - t0 >= 0.29
        assert pub.stats()["slots_free"] == 5  # nothing was taken for the failed send
        stalled.receive(timeout=1).release()
        stalled.receive(timeout=0)
        assert pub.send(b"y", timeout=5) == 1
        stalled.close()


def test_subscriber_window_is_clamped_and_reported():
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=4) as pub:
        big = Subscriber(pub.url, window=100)
        small = Subscriber(pub.url, window=2)
        connect(pub, big, small)
        assert (big.window, small.window) == (4, 2)
        pub.send(b"a")
        m = small.receive(timeout=5)
        s = small.stats()
        assert (s["held"], s["credit"], s["received"]) == (1, 1, 1)
        m.release()
        assert small.stats()["held"] == 0
        big.close()
        small.close()


def test_loan_publishes_in_place(route):
    with Publisher(route, slot_size=1000, slots=2) as pub:
        sub = Subscriber(pub.url)
        connect(pub, sub)
        with pub.loan(5, meta=b"L") as buf:
            assert len(buf) == 5 and not buf.readonly
            buf[:] = b"hello"
        msg = sub.receive(timeout=5)
        assert bytes(msg) == b"hello" and msg.meta == b"L"
        msg.release()
        sub.close()


def test_exception_inside_a_loan_discards_it(route):
    with Publisher(route, slot_size=1000, slots=2) as pub:
        sub = Subscriber(pub.url)
        connect(pub, sub)
        with pytest.raises(RuntimeError):
            with pub.loan(10) as buf:
                buf[:2] = b"no"
                raise RuntimeError("camera failed")
        assert pub.stats()["slots_free"] == 2 and pub.stats()["sent"] == 0
        assert sub.receive(timeout=0.2) is None
        sub.close()


def test_a_view_kept_past_the_loan_is_refused(route):
    with Publisher(route, slot_size=1000, slots=2) as pub:
        sub = Subscriber(pub.url)
        connect(pub, sub)
        kept = []
        with pytest.raises(BufferError, match="still alive"):
            with pub.loan(10) as buf:
                kept.append(memoryview(buf))
        assert sub.receive(timeout=0.2) is None
        kept[0].release()
        assert pub.stats()["slots_free"] == 2
        with pytest.raises(ValueError, match="cannot loan"):
            with pub.loan(1001):
                pass
        sub.close()


def test_batch_sends_many_addresses_in_few_syscalls(route):
    with Publisher(route, slot_size=64, slots=64) as pub:
        sub = Subscriber(pub.url, window=64)
        connect(pub, sub)
        peer = pub._ready[0]
        with pub.batch():
            for i in range(50):
                pub.send(bytes([i]))
            assert peer.stream.pending == 50 * (8 + 56)  # queued, not yet written
        assert peer.stream.pending == 0
        got = [sub.receive(timeout=5) for _ in range(50)]
        assert [bytes(m) for m in got] == [bytes([i]) for i in range(50)]
        got.clear()
        sub.close()
