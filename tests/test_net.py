"""fastshm.net: publisher and subscriber over tcp and unix, in and across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastshm import (
    Disconnected, Full, GenerationError, Message, ProtocolError, Publisher, Subscriber,
    parse_url,
)
from fastshm.demo import expected_frame, pattern
from handshakes import connect

PEERS = str(Path(__file__).with_name("peers.py"))
FRAME = 1920 * 1080 * 3


def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, PEERS, *args], stdout=subprocess.PIPE, text=True,
                            env=env)


def last_json(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def connected(route):
    pub = Publisher(route, slot_size=4096, slots=4)
    sub = Subscriber(pub.url, connect_timeout=5)
    connect(pub, sub)
    assert sub.ready and sub.transport == "shm"
    yield pub, sub
    sub.close()
    pub.close()


def test_parse_url():
    assert parse_url("tcp://127.0.0.1:5555") == (socket.AF_INET, ("127.0.0.1", 5555))
    assert parse_url("tcp://[::1]:1")[0] == socket.AF_INET6
    assert parse_url("unix:///run/x.sock") == (socket.AF_UNIX, "/run/x.sock")
    assert parse_url("unix://@abstract") == (socket.AF_UNIX, "\0abstract")
    for bad in ["http://x:1", "tcp://host", "tcp://:1", "tcp://h:99999", "unix://rel/path"]:
        with pytest.raises(ValueError):
            parse_url(bad)


def test_send_and_receive_a_zero_copy_view(connected):
    pub, sub = connected
    assert pub.send(b"hello world", meta=b"m") == 1
    msg = sub.receive(timeout=5)
    assert isinstance(msg, Message)
    assert bytes(msg) == b"hello world" and msg.nbytes == 11 and len(msg) == 11
    assert msg.seq == 1 and msg.meta == b"m" and not msg.inline
    assert abs(msg.timestamp_ns - time.time_ns()) < 10e9
    view = memoryview(msg)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0
    view.release()
    msg.release()
    assert msg.released
    with pytest.raises(ValueError, match="released"):
        memoryview(msg)


def test_receive_times_out_with_none(connected):
    _, sub = connected
    t0 = time.monotonic()
    assert sub.receive(timeout=0.1) is None
    assert time.monotonic() - t0 >= 0.09
    assert sub.receive(timeout=0) is None


def test_release_with_live_views_is_a_buffer_error(connected):
    pub, sub = connected
    pub.send(b"x")
    msg = sub.receive(timeout=5)
    view = memoryview(msg)
    with pytest.raises(BufferError):
        msg.release()
    view.release()
    msg.release()


def test_slots_come_back_when_messages_are_released(connected):
    pub, sub = connected
    for i in range(50):  # 4 slots, reused over and over
        pub.send(bytes([i]) * 100, timeout=5)
        with sub.receive(timeout=5) as msg:
            assert bytes(msg) == bytes([i]) * 100
    assert pub.stats()["sent"] == 50


def test_dropped_messages_release_their_slots(connected):
    pub, sub = connected
    for i in range(20):
        pub.send(b"y" * 10, timeout=5)
        assert sub.receive(timeout=5) is not None  # dropped at once: released on dealloc


def test_full_when_the_subscriber_holds_every_slot(connected):
    pub, sub = connected
    held = []
    for _ in range(4):
        pub.send(b"z", timeout=5)
        held.append(sub.receive(timeout=5))
    t0 = time.monotonic()
    with pytest.raises(Full, match="window of 4 message"):
        pub.send(b"z", timeout=0.2)
    assert time.monotonic() - t0 >= 0.19
    assert isinstance(Full(), TimeoutError)
    held.pop().release()
    assert sub.receive(timeout=0) is None  # sends the release
    assert pub.send(b"again", timeout=5) == 1
    assert bytes(sub.receive(timeout=5)) == b"again"


def test_payload_larger_than_a_slot_is_refused(connected):
    pub, _ = connected
    with pytest.raises(ValueError, match="does not fit"):
        pub.send(b"x" * 4097)
    assert pub.stats()["slots_free"] == 4


def test_send_without_subscribers_reaches_nobody(route):
    with Publisher(route, slot_size=64, slots=2) as pub:
        for _ in range(5):
            assert pub.send(b"lost") == 0
        assert pub.stats()["unsent"] == 5


def test_publisher_close_unlinks_and_says_goodbye(connected):
    pub, sub = connected
    pub.send(b"kept")
    msg = sub.receive(timeout=5)
    name = pub.segment_name
    assert os.path.exists(f"/dev/shm/{name}")
    pub.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    assert bytes(msg) == b"kept"  # the mapping outlives the name
    with pytest.raises(Disconnected, match="closed the route"):
        sub.receive(timeout=5)
    assert list(sub) == []
    msg.release()


def test_iteration_ends_when_the_publisher_closes(connected):
    pub, sub = connected
    for i in range(3):
        pub.send(bytes([i]))
    pub.close()
    assert [bytes(m) for m in sub] == [b"\0", b"\1", b"\2"]


def test_unix_socket_file_is_removed_on_close(tmp_path):
    path = tmp_path / "p.sock"
    with Publisher(f"unix://{path}", slot_size=64, slots=1):
        assert path.exists()
        with pytest.raises(OSError, match="another publisher"):
            Publisher(f"unix://{path}", slot_size=64, slots=1)
    assert not path.exists()


def test_stale_unix_socket_file_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    with Publisher(f"unix://{path}", slot_size=64, slots=1) as pub:
        with Subscriber(pub.url, connect_timeout=5) as sub:
            connect(pub, sub)


def test_subscriber_waits_for_a_late_publisher(route, tmp_path):
    if route.startswith("tcp"):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        route = f"tcp://127.0.0.1:{port}"
    proc = spawn("subscriber", route, "--size", "64", "--count", "1")
    time.sleep(0.5)
    with Publisher(route, slot_size=64, slots=2) as pub:
        pub.wait_for_subscribers(1, timeout=20)
        pub.send(expected_frame(pattern(64), 1, 64))
        assert last_json(proc) == {"received": 1, "bad": 0}


def test_connect_timeout_is_a_timeout_error(tmp_path):
    with pytest.raises(TimeoutError, match="could not connect"):
        Subscriber(f"unix://{tmp_path}/nobody.sock", connect_timeout=0.2)


def test_generation_mismatch_is_refused(connected):
    pub, sub = connected
    pub.send(b"a")
    first = sub.receive(timeout=5)
    pub.send(b"b")
    # Make the address in flight stale: bump every slot's generation in the header.
    from fastshm import _core
    for slot in range(4):
        pub._pool.segment.store_u64(_core.SEGMENT_HEADER_SIZE + slot * _core.SLOT_ENTRY_SIZE, 999)
    with pytest.raises(GenerationError, match="stale or forged"):
        sub.receive(timeout=5)
    first.release()


def test_a_bad_release_closes_only_that_connection(route):
    with Publisher(route, slot_size=64, slots=2) as pub:
        good = Subscriber(pub.url, connect_timeout=5)
        bad = Subscriber(pub.url, connect_timeout=5)
        connect(pub, good, bad)
        bad._stream.queue_release(1, 1, 12345)  # a slot it never held
        bad._stream.flush(1)
        with pytest.raises((ProtocolError, Disconnected)):
            for _ in range(100):
                pub.poll(0.01)
                bad.receive(timeout=0.01)
        assert pub.subscribers == 1
        pub.send(b"still served")
        assert bytes(good.receive(timeout=5)) == b"still served"
        good.close()
        bad.close()


def test_subscriber_that_vanishes_mid_stream_gives_its_slots_back(route):
    with Publisher(route, slot_size=1024, slots=4) as pub:
        proc = spawn("subscriber", pub.url, "--size", "1024", "--hold", "4", "--exit-after", "4")
        pub.wait_for_subscribers(1, timeout=20)
        base = pattern(1024)
        for seq in range(1, 5):
            pub.send(expected_frame(base, seq, 1024), timeout=5)
        assert last_json(proc)["received"] == 4
        deadline = time.monotonic() + 10
        while pub.subscribers and time.monotonic() < deadline:
            pub.poll(0.05)
        assert pub.subscribers == 0
        assert pub.stats()["slots_free"] == 4
        assert pub.send(b"x", timeout=1) == 0


def test_multiprocess_frames_every_byte_checked(route):
    """1,000 frames of 6,220,800 bytes from a publisher process, every byte checked."""
    pub = spawn("publisher", route, "--size", str(FRAME), "--count", "1000", "--slots", "8")
    try:
        url = json.loads(pub.stdout.readline())["url"]
        sub = spawn("subscriber", url, "--size", str(FRAME), "--count", "1000")
        assert last_json(sub, 300) == {"received": 1000, "bad": 0}
        assert last_json(pub, 60) == {"sent": 1000}
    finally:
        for p in (pub,):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_subscriber_process_in_reverse_direction(route):
    """A publisher in this process, a subscriber process verifying 200 frames."""
    size = 100_000
    base = pattern(size)
    with Publisher(route, slot_size=size, slots=3) as pub:
        proc = spawn("subscriber", pub.url, "--size", str(size), "--count", "200")
        pub.wait_for_subscribers(1, timeout=20)
        for seq in range(1, 201):
            assert pub.send(expected_frame(base, seq, size), timeout=20) == 1
        assert last_json(proc) == {"received": 200, "bad": 0}


def test_messages_released_in_other_threads(route):
    """Releases queued from worker threads while the receiving thread flushes."""
    import queue
    import threading

    from handshakes import connect

    with Publisher(route, slot_size=256, slots=32) as pub:
        sub = Subscriber(pub.url, window=32)
        connect(pub, sub)
        work: "queue.Queue[object]" = queue.Queue()

        def worker():
            while True:
                msg = work.get()
                if msg is None:
                    return
                assert bytes(msg)[:1] in (b"a", b"b")
                del msg  # released here, in this thread

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        received = 0
        for i in range(3000):
            while True:
                try:
                    pub.send(b"a" * 200 if i % 2 else b"b" * 100, timeout=0.01)
                    break
                except Full:
                    sub.flush(0)  # the workers' releases wait in this thread's stream
            while True:
                msg = sub.receive(timeout=0)
                if msg is None:
                    break
                work.put(msg)
                received += 1
                del msg
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
        while received < 3000:
            msg = sub.receive(timeout=5)
            assert msg is not None
            received += 1
            del msg
        sub.flush(5)
        deadline = time.monotonic() + 10
        while pub.stats()["slots_free"] < 32 and time.monotonic() < deadline:
            pub.poll(0.01)
        assert pub.stats()["slots_free"] == 32
        sub.close()
