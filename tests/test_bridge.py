"""The Zenoh bridge: a fastshm channel spanning hosts.

The two-host test makes two network namespaces joined by a veth pair, each
with its own private /dev/shm (a mount namespace): a writer and an exporting
bridge in one, an importing bridge and two readers in the other.  It needs
root; where the kernel refuses, it skips and says why.  The other tests run
both bridges in this process over loopback.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

from fastshm import Disconnected, Publisher, Subscriber
from fastshm import bridge as B

zenoh = pytest.importorskip("zenoh", reason='the bridge needs the extra "fastshm[zenoh]"')

PEER = str(Path(__file__).with_name("bridge_peer.py"))
FRAME = 1920 * 1080 * 3


def test_header_round_trip_and_refusal():
    att = B.pack_header(2, 7, 123456789, b"meta")
    assert B.unpack_header(att) == (2, 7, 123456789, b"meta")
    for bad in (b"", b"FSZ1", b"XXXX" + att[4:]):
        with pytest.raises(ValueError, match="not a fastshm bridge attachment"):
            B.unpack_header(bad)


def test_policies_and_priorities_map_onto_zenoh():
    assert B._congestion("block") == zenoh.CongestionControl.BLOCK
    assert B._congestion("drop") == B._congestion("latest") == zenoh.CongestionControl.DROP
    assert B._priority("real-time") == zenoh.Priority.REAL_TIME
    assert B._priority("background") == zenoh.Priority.BACKGROUND
    with pytest.raises(ValueError, match="policy"):
        B._congestion("fast")
    with pytest.raises(ValueError, match="priority"):
        B._priority("urgent")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sessions():
    endpoint = f"tcp/127.0.0.1:{_port()}"
    a = B.open_session(listen=[endpoint])
    b = B.open_session(connect=[endpoint])
    yield a, b
    b.close()
    a.close()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_loopback_arrays_metadata_wildcards_and_liveliness(sessions, tmp_path):
    """Two channels under one wildcard; dtype, shape and metadata survive; a
    source that closes closes its republished route."""
    np = pytest.importorskip("numpy")
    a, b = sessions
    stop = threading.Event()
    srcs = [Publisher("tcp://127.0.0.1:0", slot_size=4096, slots=4) for _ in range(2)]
    exporters = [B.Exporter(a, s.url, f"t/cam{i}") for i, s in enumerate(srcs)]
    importer = B.Importer(b, "t/*", f"unix://{tmp_path}/{{key}}.sock", slot_size=4096)
    threads = [threading.Thread(target=x.run, args=(stop,)) for x in [*exporters, importer]]
    for t in threads:
        t.start()
    try:
        for s in srcs:
            s.wait_for_subscribers(1, timeout=10)
        _wait(lambda: len(importer.channels) == 2)
        assert importer.url_for("t/cam1") == f"unix://{tmp_path}/t.cam1.sock"
        subs = [Subscriber(importer.url_for(f"t/cam{i}")) for i in range(2)]
        for sub in subs:
            sub.wait_ready(10)
        for i, s in enumerate(srcs):
            s.send(np.arange(12, dtype="<f4").reshape(3, 4) * (i + 1), meta=b"m%d" % i)
            s.send(b"plain", meta=b"")
        for i, sub in enumerate(subs):
            with sub.receive(timeout=10) as msg:
                assert msg.meta == b"m%d" % i
                arr = msg.array()
                assert arr.dtype == np.dtype("<f4") and arr.shape == (3, 4)
                assert (arr == np.arange(12).reshape(3, 4) * (i + 1)).all()
                del arr
            with sub.receive(timeout=10) as msg:
                assert bytes(msg) == b"plain" and msg.meta == b""
        srcs[0].close()  # the token goes: the republished route of cam0 closes, cam1 stays
        with pytest.raises(Disconnected):
            subs[0].receive(timeout=10)
        _wait(lambda: set(importer.channels) == {"t/cam1"})
        srcs[1].send(b"still here")
        with subs[1].receive(timeout=10) as msg:
            assert bytes(msg) == b"still here"
        for sub in subs:
            sub.close()
    finally:
        stop.set()
        for t in threads:
            t.join()
        for x in [*exporters, importer]:
            x.close()
        for s in srcs:
            s.close()


def test_exporter_refuses_wildcards(sessions):
    with pytest.raises(ValueError, match="wildcards"):
        B.Exporter(sessions[0], "tcp://127.0.0.1:1", "cam/*")


# --- two hosts: network namespaces over a veth pair, each with its own /dev/shm ---

def _run(*cmd: str) -> str:
    rc = subprocess.run(cmd, capture_output=True, text=True)
    return "" if rc.returncode == 0 else f"{' '.join(cmd)}: {rc.stderr.strip()}"


@pytest.fixture
def two_hosts():
    """Two "hosts": holder processes in two network namespaces joined by a veth
    pair (10.214.x.1 and .2), each holding a mount namespace with a private
    tmpfs on /dev/shm.  Yields ``(enter_a, enter_b, address_a)``, where
    ``enter_x`` is the command prefix that runs a program on that host."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "unshare", "nsenter")):
        pytest.skip("needs root, ip(8), unshare(1) and nsenter(1) for two network namespaces")
    tag = f"fz{os.getpid() % 100000}"
    ns = [f"{tag}a", f"{tag}b"]
    net = f"10.214.{os.getpid() % 250}"
    holders: List[subprocess.Popen] = []
    try:
        steps = [
            ("ip", "netns", "add", ns[0]), ("ip", "netns", "add", ns[1]),
            ("ip", "link", "add", f"{tag}x", "netns", ns[0], "type", "veth",
             "peer", "name", f"{tag}y", "netns", ns[1]),
            ("ip", "-n", ns[0], "addr", "add", f"{net}.1/30", "dev", f"{tag}x"),
            ("ip", "-n", ns[1], "addr", "add", f"{net}.2/30", "dev", f"{tag}y"),
        ]
        for n, dev in ((ns[0], f"{tag}x"), (ns[1], f"{tag}y")):
            steps += [("ip", "-n", n, "link", "set", dev, "up"),
                      ("ip", "-n", n, "link", "set", "lo", "up")]
        for step in steps:
            problem = _run(*step)
            if problem:
                pytest.skip(f"the kernel refused a network namespace: {problem}")
        script = 'mount -t tmpfs -o size=256m tmpfs /dev/shm && echo ready && exec sleep 3600'
        for n in ns:
            h = subprocess.Popen(["ip", "netns", "exec", n, "unshare", "--mount", "sh", "-c",
                                  script], stdout=subprocess.PIPE, text=True)
            holders.append(h)
            if h.stdout.readline().strip() != "ready":
                pytest.skip("the kernel refused a private /dev/shm in a network namespace")
        enter = [("nsenter", "-t", str(h.pid), "-m", "-n", "--") for h in holders]
        yield enter[0], enter[1], f"{net}.1"
    finally:
        for h in holders:
            h.kill()
            h.wait()
            h.stdout.close()
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


class Proc:
    """A process on one of the hosts whose JSON lines are read by a thread."""

    def __init__(self, prefix, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.p = subprocess.Popen([*prefix, sys.executable, *args], stdout=subprocess.PIPE,
                                  text=True, env=env)
        self.lines: "queue.Queue[Dict]" = queue.Queue()
        self.last: Dict = {}
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def until(self, cond, timeout=60.0) -> Dict:
        deadline = time.monotonic() + timeout
        while not cond(self.last):
            left = deadline - time.monotonic()
            assert left > 0 and self.p.poll() is None, f"gave up waiting; last: {self.last}"
            try:
                self.last = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                pass
        return self.last

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._t.join(5)
        while not self.lines.empty():
            self.last = self.lines.get()
        self.p.stdout.close()


def test_two_hosts_every_byte_and_bridges_restarted(two_hosts):
    enter_a, enter_b, addr_a = two_hosts
    zenoh_a = f"tcp/{addr_a}:7447"
    export = ("-m", "fastshm", "bridge", "export", "--channel", "cam/a=tcp://127.0.0.1:5555",
              "--listen", zenoh_a)
    imp = ("-m", "fastshm", "bridge", "import", "--key", "cam/**", "--publish",
           "tcp://127.0.0.1:5556", "--connect", zenoh_a, "--slot-size", str(FRAME))
    procs: List[Proc] = []
    try:
        writer = Proc(enter_a, PEER, "writer", "tcp://127.0.0.1:5555", "--rate", "30")
        procs.append(writer)
        writer.until(lambda d: "url" in d)
        exporter = Proc(enter_a, *export)
        importer = Proc(enter_b, *imp)
        readers = [Proc(enter_b, PEER, "reader", "tcp://127.0.0.1:5556") for _ in range(2)]
        procs += [exporter, importer, *readers]
        for r in readers:
            r.until(lambda d: d.get("frames", 0) >= 20)

        # The importing bridge dies; readers lose their route and come back to the new one.
        importer.stop(signal.SIGKILL)
        importer = Proc(enter_b, *imp)
        procs.append(importer)
        for r in readers:
            r.until(lambda d: d.get("connections", 0) >= 2 and d.get("frames", 0) >= 50, 90)

        # The exporting bridge dies: its liveliness token goes, the remote route closes;
        # a new bridge brings it back.
        exporter.stop(signal.SIGKILL)
        exporter = Proc(enter_a, *export)
        procs.append(exporter)
        for r in readers:
            r.until(lambda d: d.get("connections", 0) >= 3 and d.get("frames", 0) >= 80, 90)
    finally:
        for p in reversed(procs):
            p.stop()
    reports = [r.last for r in readers]
    for rep in reports:
        assert rep["done"] and rep["bad"] == 0 and rep["connections"] >= 3, reports
    assert writer.last["done"] and writer.last["sent"] >= max(r["frames"] for r in reports)
