"""Crash safety: subscribers and publishers killed with SIGKILL, and what is left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastshm import Disconnected, Publisher, Segment, Subscriber
from fastshm.demo import expected_frame, pattern

from handshakes import connect
from test_net import spawn


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastshm", *args], capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def test_killed_subscriber_gives_its_slots_back(route):
    with Publisher(route, slot_size=4096, slots=4) as pub:
        proc = spawn("subscriber", pub.url, "--size", "4096", "--hold", "100", "--linger",
                     "60", "--count", "3")
        pub.wait_for_subscribers(1, timeout=20)
        assert json.loads(proc.stdout.readline()) == {"connected": True}
        base = pattern(4096)
        for seq in range(1, 4):
            pub.send(expected_frame(base, seq, 4096), timeout=5)
        deadline = time.monotonic() + 10
        while pub.stats()["slots_held"] < 3 and time.monotonic() < deadline:
            pub.poll(0.05)
        assert pub.stats()["slots_held"] == 3
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        deadline = time.monotonic() + 10
        while pub.subscribers and time.monotonic() < deadline:
            pub.poll(0.05)
        assert pub.subscribers == 0
        assert pub.stats()["slots_free"] == 4


def test_tcp_keepalive_bounds_the_wait_for_a_vanished_peer():
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1, keepalive=3) as pub:
        sub = Subscriber(pub.url, keepalive=3)
        connect(pub, sub)
        peer = pub._ready[0].sock
        for sock in (peer, sub._sock):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
        sub.close()


def test_killed_publisher_disconnects_cleanly_and_gc_reaps_its_segment(route):
    proc = spawn("publisher", route, "--size", "4096", "--count", "2", "--slots", "4",
                 "--linger", "60")
    try:
        hello = json.loads(proc.stdout.readline())
        sub = Subscriber(hello["url"], connect_timeout=20)
        held = [sub.receive(timeout=20), sub.receive(timeout=20)]
        assert json.loads(proc.stdout.readline()) == {"sent": 2}
        name = hello["segment"]
        assert Segment.owner_alive(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with pytest.raises(ConnectionError):
            sub.receive(timeout=20)
        assert isinstance(sub._gone, Disconnected)
        # The views the subscriber holds stay readable after the crash.
        base = pattern(4096)
        assert bytes(held[0]) == bytes(expected_frame(base, 1, 4096))
        assert bytes(held[1]) == bytes(expected_frame(base, 2, 4096))
        assert os.path.exists(f"/dev/shm/{name}") and not Segment.owner_alive(name)
        listing = run_cli("ls", "--json")
        entry = [json.loads(line) for line in listing.stdout.splitlines()
                 if json.loads(line)["name"] == name][0]
        assert entry["alive"] is False and entry["slots"] == 4 and entry["slot_size"] == 4096
        # --prefix: only this test's segment; other runs on the machine keep theirs.
        out = run_cli("gc", "--min-age", "0", "--prefix", name)
        assert out.returncode == 0 and f"removed {name}" in out.stdout
        assert not os.path.exists(f"/dev/shm/{name}")
        probes = run_cli("gc", "--min-age", "0", "--prefix", "fastshm.probe-")
        assert probes.returncode == 0 and "removed fastshm.probe-" in probes.stdout
        held.clear()
        sub.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_gc_spares_live_segments():
    with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1) as pub:
        out = run_cli("gc", "--min-age", "0", "--prefix", pub.segment_name)
        assert pub.segment_name not in out.stdout and "removed 0 segment" in out.stdout
        assert os.path.exists(f"/dev/shm/{pub.segment_name}")
        listing = run_cli("ls")
        line = [ln for ln in listing.stdout.splitlines() if pub.segment_name in ln][0]
        assert line.endswith("live") and str(os.getpid()) in line


def test_next_publisher_on_the_channel_reaps_a_dead_ones_segments():
    channel = f"reap{os.getpid()}"
    proc = spawn("publisher", "tcp://127.0.0.1:0", "--size", "64", "--count", "0",
                 "--channel", channel, "--linger", "60")
    try:
        dead = json.loads(proc.stdout.readline())["segment"]
        assert dead.startswith(f"fastshm.{channel}.")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert os.path.exists(f"/dev/shm/{dead}")
        time.sleep(0.6)  # a channel publisher spares segments younger than 0.5 s
        with Publisher("tcp://127.0.0.1:0", slot_size=64, slots=1, channel=channel) as pub:
            assert not os.path.exists(f"/dev/shm/{dead}")
            assert pub.segment_name.startswith(f"fastshm.{channel}.")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

