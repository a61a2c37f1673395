"""The demo job: a writer process streams frames to a reader process.

``python -m fastshm demo`` starts both as separate processes, lets the writer
publish frames (1920x1080 RGB by default) over a TCP or Unix route for a few
seconds, has the reader check every byte of every frame, and prints a summary:
frames, bytes, frames/s, GB/s, latency percentiles, errors, and the segments
left behind in ``/dev/shm``.

Frame ``n`` is the slice ``[n % 251, n % 251 + size)`` of a pattern repeating
every 251 bytes, so each frame's content depends on its sequence number, the
writer makes frames without computing anything, and the reader can check every
byte with one ``memcmp``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from fastshm._core import buffers_equal
from fastshm.net import Publisher, Subscriber

__all__ = ["run_demo", "pattern", "expected_frame", "shm_segments"]

PERIOD = 251
FRAME_1080P = 1920 * 1080 * 3


def pattern(size: int) -> bytes:
    """The repeating pattern frames are cut from (``size + 251`` bytes)."""
    unit = bytes(range(PERIOD))
    return (unit * (size // PERIOD + 2))[: size + PERIOD]


def expected_frame(base: bytes, seq: int, size: int) -> memoryview:
    """The content of frame ``seq``: a view of ``base``, no copy."""
    start = seq % PERIOD
    return memoryview(base)[start:start + size]


def shm_segments() -> List[str]:
    """Names of the fastshm segments in ``/dev/shm`` now."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith("fastshm."))
    except FileNotFoundError:
        return []


def _percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def writer_main(args: argparse.Namespace) -> int:
    """The writer process: publish frames, then close the route."""
    base = pattern(args.size)
    with Publisher(args.url, slot_size=args.size, slots=args.slots, channel="demo") as pub:
        print(json.dumps({"url": pub.url, "segment": pub.segment_name}), flush=True)
        pub.wait_for_subscribers(1, timeout=args.connect_timeout)
        interval = 1.0 / args.rate if args.rate > 0 else 0.0
        start = time.perf_counter()
        stop_at = start + args.seconds if args.seconds > 0 else float("inf")
        sent = 0
        next_at = start
        while sent < args.count if args.count > 0 else time.perf_counter() < stop_at:
            if interval:
                now = time.perf_counter()
                if now < next_at:
                    time.sleep(next_at - now)
                next_at += interval
            # Sequence numbers start at 1: frame n is cut at n % PERIOD.
            if pub.send(expected_frame(base, sent + 1, args.size), timeout=30.0) == 0:
                break
            sent += 1
        elapsed = time.perf_counter() - start
        stats = pub.stats()
    print(json.dumps({"sent": sent, "seconds": elapsed, "stats": stats}), flush=True)
    return 0


def reader_main(args: argparse.Namespace) -> int:
    """The reader process: receive, verify every byte, report as JSON."""
    base = pattern(args.size)
    latencies: List[float] = []
    received = 0
    nbytes = 0
    errors: List[str] = []
    last_seq = 0
    first_at: Optional[float] = None
    with Subscriber(args.url, connect_timeout=args.connect_timeout, identity="demo reader") as sub:
        for msg in sub:
            now_ns = time.time_ns()
            with msg:
                if first_at is None:
                    first_at = time.perf_counter()
                latencies.append((now_ns - msg.timestamp_ns) / 1e6)
                seq = msg.seq
                if seq != last_seq + 1 and len(errors) < 20:
                    errors.append(f"frame {seq} after {last_seq}: {seq - last_seq - 1} missing")
                last_seq = seq
                if msg.nbytes != args.size or not buffers_equal(
                        msg, expected_frame(base, seq, args.size)):
                    if len(errors) < 20:
                        errors.append(f"frame {seq}: content differs")
                received += 1
                nbytes += msg.nbytes
        last_at = time.perf_counter()
    elapsed = (last_at - first_at) if first_at is not None else 0.0
    print(json.dumps({
        "received": received, "bytes": nbytes, "seconds": elapsed, "errors": errors,
        "latency_ms_p50": _percentile(latencies, 50), "latency_ms_p99": _percentile(latencies, 99),
    }), flush=True)
    return 0


def _default_url(transport: str) -> str:
    if transport == "tcp":
        return "tcp://127.0.0.1:0"
    return f"unix://{tempfile.gettempdir()}/fastshm-demo-{os.getpid()}.sock"


def run_demo(args: argparse.Namespace) -> int:
    """Run the writer and reader processes and print the summary; 0 when all is well."""
    before = set(shm_segments())
    url = args.url or _default_url(args.transport)
    common = ["--size", str(args.size), "--connect-timeout", str(args.connect_timeout)]
    writer_cmd = [sys.executable, "-m", "fastshm", "demo-writer", "--url", url,
                  "--slots", str(args.slots), "--seconds", str(args.seconds),
                  "--count", str(args.count), "--rate", str(args.rate)] + common
    writer = subprocess.Popen(writer_cmd, stdout=subprocess.PIPE, text=True)
    reader: Optional[subprocess.Popen[str]] = None
    try:
        assert writer.stdout is not None
        line = writer.stdout.readline()
        if not line:
            writer.wait(10)
            print(f"fastshm demo: the writer failed to start (exit {writer.returncode})",
                  file=sys.stderr)
            return 1
        hello = json.loads(line)
        reader = subprocess.Popen(
            [sys.executable, "-m", "fastshm", "demo-reader", "--url", hello["url"]] + common,
            stdout=subprocess.PIPE, text=True)
        limit = args.connect_timeout + (args.seconds if args.seconds > 0 else 0) + 120
        reader_out, _ = reader.communicate(timeout=limit)
        writer_out, _ = writer.communicate(timeout=30)
    finally:
        for proc in (reader, writer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    if writer.returncode != 0 or reader.returncode != 0 or not reader_out.strip():
        print(f"fastshm demo: writer exit {writer.returncode}, reader exit {reader.returncode}",
              file=sys.stderr)
        return 1
    w = json.loads(writer_out.strip().splitlines()[-1])
    r = json.loads(reader_out.strip().splitlines()[-1])
    left = sorted(set(shm_segments()) - before)
    errors = list(r["errors"])
    if r["received"] != w["sent"]:
        errors.append(f"{w['sent']} frames sent but {r['received']} received")
    seconds = r["seconds"] or float("nan")
    summary: Dict[str, Any] = {
        "route": hello["url"], "frame_bytes": args.size, "slots": args.slots,
        "frames_sent": w["sent"], "frames_received": r["received"], "bytes": r["bytes"],
        "seconds": round(r["seconds"], 3),
        "frames_per_s": round(r["received"] / seconds, 1),
        "gb_per_s": round(r["bytes"] / seconds / 1e9, 3),
        "latency_ms_p50": round(r["latency_ms_p50"], 3),
        "latency_ms_p99": round(r["latency_ms_p99"], 3),
        "errors": len(errors), "error_details": errors, "segments_left": left,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"fastshm demo over {summary['route']}: {args.size:,}-byte frames, "
              f"{args.slots} slots, writer and reader in separate processes")
        print(f"  frames         {w['sent']} sent, {r['received']} received, every byte checked")
        print(f"  data           {r['bytes']:,} bytes in {summary['seconds']} s")
        print(f"  throughput     {summary['frames_per_s']} frames/s, {summary['gb_per_s']} GB/s")
        print(f"  latency        p50 {summary['latency_ms_p50']} ms, "
              f"p99 {summary['latency_ms_p99']} ms (send to receive)")
        print(f"  errors         {len(errors)}")
        for e in errors[:10]:
            print(f"                 {e}")
        print(f"  segments left  {len(left)}" + (f" ({', '.join(left)})" if left else ""))
    ok = not errors and not left and r["received"] > 0
    return 0 if ok else 1


def add_arguments(parser: argparse.ArgumentParser, *, role: bool = False) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--size", type=int, default=FRAME_1080P,
                        help="frame size in bytes (default: 1920x1080x3 = 6220800)")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to wait for the other process (default 30)")
    if role:
        parser.add_argument("--url", required=True)
        parser.add_argument("--slots", type=int, default=8)
        parser.add_argument("--seconds", type=float, default=3.0)
        parser.add_argument("--count", type=int, default=0)
        parser.add_argument("--rate", type=float, default=0.0)
        return
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                        help="route to use (default tcp)")
    parser.add_argument("--url", default=None,
                        help="explicit route, e.g. tcp://127.0.0.1:5555 (overrides --transport)")
    parser.add_argument("--slots", type=int, default=8, help="slots in the pool (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="how long to stream (default 3; ignored with --count)")
    parser.add_argument("--count", type=int, default=0, help="send exactly this many frames")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="frames per second (default 0: as fast as the reader takes them)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
