"""Two hosts, one run: 6.2 MB frames from one network namespace to another.

Three routes, each a writer in namespace A and a reader in namespace B (a veth
pair between them, each with its own private /dev/shm, so shared memory can
never cross):

``fastshm + bridge``
    fastshm writer -> ``fastshm bridge export`` (A) -> Zenoh -> ``fastshm bridge
    import`` (B) -> fastshm reader (zero-copy on B).
``zenoh``
    Zenoh alone: ``session.put`` in A, a subscriber in B that takes the
    payload as bytes (``to_bytes()``, the way Python code reads it).
``fastshm inline``
    fastshm's own route: a publisher in A, a subscriber in B that cannot map
    A's memory and so receives each payload inside the TCP connection.

The writer sends as fast as the route takes (blocking flow control
everywhere); the reader counts frames for ``--seconds`` after a warm-up and
takes each frame's latency from the writer's wall-clock stamp (both
namespaces share the clock).  Run as root: ``python bench/bridge_hosts.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

FRAME = 1920 * 1080 * 3
STAMP = struct.Struct("<Q")
ZKEY = "bench/frame"


# --- the roles, run inside a namespace -------------------------------------------

def _stopper() -> List[bool]:
    flag = [False]
    signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__(0, True))
    return flag


def fastshm_writer(url: str) -> None:
    from fastshm import Publisher

    stop, frame = _stopper(), bytes(FRAME)
    with Publisher(url, slot_size=FRAME, slots=8, secret="bench") as pub:
        print("ready", flush=True)
        while not stop[0]:
            pub.send(frame, timeout=30, meta=STAMP.pack(time.time_ns()))


def fastshm_reader(url: str, seconds: float, warmup: float) -> Dict[str, float]:
    from fastshm import Subscriber

    lat: List[int] = []
    with Subscriber(url, secret="bench", connect_timeout=30) as sub:
        start = time.monotonic()
        frames, t0 = 0, None
        while True:
            msg = sub.receive(timeout=30)
            now = time.time_ns()
            assert msg is not None and msg.nbytes == FRAME
            (stamp,) = STAMP.unpack(msg.meta)
            inline = msg.inline
            msg.release()
            if t0 is None:
                if time.monotonic() - start < warmup:
                    continue
                t0 = time.monotonic()
            frames += 1
            lat.append(now - stamp)
            if time.monotonic() - t0 >= seconds:
                break
    return _summary(frames, time.monotonic() - t0, lat, inline=inline)


def zenoh_writer(listen: str) -> None:
    from fastshm.bridge import open_session
    import zenoh

    stop, frame = _stopper(), bytes(FRAME)
    session = open_session(listen=[listen])
    pub = session.declare_publisher(ZKEY, congestion_control=zenoh.CongestionControl.BLOCK)
    print("ready", flush=True)
    while not stop[0]:
        pub.put(frame, attachment=STAMP.pack(time.time_ns()))
    session.close()


def zenoh_reader(connect: str, seconds: float, warmup: float) -> Dict[str, float]:
    import queue

    from fastshm.bridge import open_session

    q: "queue.Queue[Tuple[int, bytes, bytes]]" = queue.Queue(4)
    session = open_session(connect=[connect])
    sub = session.declare_subscriber(
        ZKEY, lambda s: q.put((time.time_ns(), s.payload.to_bytes(), s.attachment.to_bytes())))
    lat: List[int] = []
    start, frames, t0 = time.monotonic(), 0, None
    while True:
        now, payload, att = q.get(timeout=30)
        assert len(payload) == FRAME
        if t0 is None:
            if time.monotonic() - start < warmup:
                continue
            t0 = time.monotonic()
        frames += 1
        lat.append(now - STAMP.unpack(att)[0])
        if time.monotonic() - t0 >= seconds:
            break
    elapsed = time.monotonic() - t0
    sub.undeclare()
    session.close()
    return _summary(frames, elapsed, lat)


def _summary(frames: int, elapsed: float, lat: List[int], **extra: object) -> Dict[str, float]:
    lat.sort()
    return {"frames": frames, "seconds": round(elapsed, 3),
            "fps": round(frames / elapsed, 1),
            "p50_ms": round(lat[len(lat) // 2] / 1e6, 2),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6, 2), **extra}


# --- the orchestration, in the root namespace --------------------------------------

def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextmanager
def two_hosts() -> Iterator[Tuple[List[str], List[str], str]]:
    """Two namespaces over a veth pair, each with a private /dev/shm (see tests/test_bridge.py)."""
    tag = f"fb{os.getpid() % 100000}"
    ns, net = [f"{tag}a", f"{tag}b"], f"10.215.{os.getpid() % 250}"
    holders: List[subprocess.Popen] = []
    try:
        _sh("ip", "netns", "add", ns[0])
        _sh("ip", "netns", "add", ns[1])
        _sh("ip", "link", "add", f"{tag}x", "netns", ns[0], "type", "veth",
            "peer", "name", f"{tag}y", "netns", ns[1])
        for i, (n, dev) in enumerate(((ns[0], f"{tag}x"), (ns[1], f"{tag}y"))):
            _sh("ip", "-n", n, "addr", "add", f"{net}.{i + 1}/30", "dev", dev)
            _sh("ip", "-n", n, "link", "set", dev, "up")
            _sh("ip", "-n", n, "link", "set", "lo", "up")
            h = subprocess.Popen(["ip", "netns", "exec", n, "unshare", "--mount", "sh", "-c",
                                  "mount -t tmpfs -o size=256m tmpfs /dev/shm && echo ready"
                                  " && exec sleep 3600"], stdout=subprocess.PIPE, text=True)
            holders.append(h)
            assert h.stdout is not None and h.stdout.readline().strip() == "ready"
        a, b = (["nsenter", "-t", str(h.pid), "-m", "-n", "--"] for h in holders)
        yield a, b, f"{net}.1"
    finally:
        for h in holders:
            h.kill()
            h.wait()
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _start(prefix: List[str], *args: str, wait_ready: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([*prefix, sys.executable, *args], stdout=subprocess.PIPE, text=True,
                         env=env)
    if wait_ready:
        line = p.stdout.readline() if p.stdout is not None else ""
        assert "ready" in line or line.startswith("bridge:"), line
    return p


def _finish(procs: List[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout:
            p.stdout.close()


def measure(route: str, a: List[str], b: List[str], addr: str, seconds: float,
            warmup: float) -> Dict[str, float]:
    me = os.path.abspath(__file__)
    timing = ("--seconds", str(seconds), "--warmup", str(warmup))
    procs: List[subprocess.Popen] = []
    try:
        if route == "fastshm + bridge":
            procs.append(_start(a, me, "fastshm-writer", "tcp://127.0.0.1:5555", wait_ready=True))
            procs.append(_start(a, "-m", "fastshm", "bridge", "export", "--secret", "bench",
                                "--channel", f"{ZKEY}=tcp://127.0.0.1:5555",
                                "--listen", f"tcp/{addr}:7447", wait_ready=True))
            procs.append(_start(b, "-m", "fastshm", "bridge", "import", "--secret", "bench",
                                "--key", ZKEY, "--publish", "tcp://127.0.0.1:5556",
                                "--connect", f"tcp/{addr}:7447", "--slot-size", str(FRAME),
                                wait_ready=True))
            reader = _start(b, me, "fastshm-reader", "tcp://127.0.0.1:5556", *timing)
        elif route == "zenoh":
            procs.append(_start(a, me, "zenoh-writer", f"tcp/{addr}:7447", wait_ready=True))
            reader = _start(b, me, "zenoh-reader", f"tcp/{addr}:7447", *timing)
        else:
            procs.append(_start(a, me, "fastshm-writer", f"tcp://{addr}:5555", wait_ready=True))
            reader = _start(b, me, "fastshm-reader", f"tcp://{addr}:5555", *timing)
        procs.append(reader)
        out, _ = reader.communicate(timeout=120 + seconds + warmup)
        return dict(json.loads(out.strip().splitlines()[-1]))
    finally:
        _finish(procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="run")
    p.add_argument("where", nargs="?")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    args = p.parse_args()
    if args.role in ("fastshm-writer", "zenoh-writer"):
        (fastshm_writer if args.role == "fastshm-writer" else zenoh_writer)(args.where)
        return
    if args.role in ("fastshm-reader", "zenoh-reader"):
        read = fastshm_reader if args.role == "fastshm-reader" else zenoh_reader
        print(json.dumps(read(args.where, args.seconds, args.warmup)), flush=True)
        return
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                          f"Python {platform.python_version()}",
               "load_before": os.getloadavg()}
    with two_hosts() as (a, b, addr):
        for route in ("fastshm + bridge", "zenoh", "fastshm inline"):
            results[route] = measure(route, a, b, addr, args.seconds, args.warmup)
            print(route, results[route], file=sys.stderr, flush=True)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    print(f"\n| route | frames/s | latency p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for route in ("fastshm + bridge", "zenoh", "fastshm inline"):
        r = results[route]
        print(f"| {route} | {r['fps']} | {r['p50_ms']} | {r['p99_ms']} |")


if __name__ == "__main__":
    main()
