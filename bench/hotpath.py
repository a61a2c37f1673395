"""What one fastshm message costs in CPU, without any scheduling noise.

Publisher and Subscriber live in one process and take turns: ``send`` one message,
``receive`` it, touch it, ``release`` it. No process waits for another, so the time per
message is the CPU the hot path costs (Python code, allocations, syscalls, the copy), the
part a busy or virtual machine cannot blur. A raw-socket loop of the same shape (sendall of
a length-prefixed frame, recv_into a preallocated buffer) runs beside it for scale.

Usage::

    python -m bench.hotpath [--size 64] [--count 200000] [--transport unix|tcp]
                            [--profile]   # cProfile of the fastshm loop, top entries
                            [--loan]      # Publisher.loan instead of send

Under ``strace -c -f`` it also gives the syscalls per message (divide by ``--count``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import struct
import tempfile
import time

import fastshm


def fastshm_loop(size: int, count: int, transport: str, loan: bool) -> float:
    tmp = tempfile.mkdtemp(prefix="fastshm-hotpath-")
    url = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix://{tmp}/p.sock"
    payload = bytearray(size)
    try:
        with fastshm.Publisher(url, slot_size=size, slots=8) as pub:
            with fastshm.Subscriber(pub.url) as sub:
                pub.wait_for_subscribers(1, timeout=10)
                sub.wait_ready(timeout=10)
                send, receive = pub.send, sub.receive
                last = size - 1

                def one() -> None:
                    if loan:
                        with pub.loan(size) as buf:
                            buf[0] = 1
                    else:
                        send(payload)
                    msg = receive()
                    with memoryview(msg) as view:
                        if len(view) != size or view[0] != (1 if loan else 0) or view[last]:
                            raise AssertionError("wrong message")
                    msg.release()

                for _ in range(1000):
                    one()
                t0 = time.perf_counter()
                for _ in range(count):
                    one()
                return (time.perf_counter() - t0) / count
    finally:
        try:
            os.rmdir(tmp)
        except OSError:
            pass


def socket_loop(size: int, count: int, transport: str) -> float:
    if transport == "tcp":
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname())
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        b, _ = lsock.accept()
        lsock.close()
    else:
        a, b = socket.socketpair()
    frame = bytearray(8 + size)
    struct.pack_into("<Q", frame, 0, size)
    buf = bytearray(8 + size)
    mv = memoryview(buf)
    hdr = struct.Struct("<Q")

    def one() -> None:
        a.sendall(frame)
        got = b.recv_into(mv)
        while got < 8 + size:
            got += b.recv_into(mv[got:])
        (n,) = hdr.unpack_from(buf)
        mv[8]
        mv[7 + n]

    try:
        for _ in range(1000):
            one()
        t0 = time.perf_counter()
        for _ in range(count):
            one()
        return (time.perf_counter() - t0) / count
    finally:
        a.close()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--loan", action="store_true")
    ap.add_argument("--only", choices=("fastshm", "socket"))
    args = ap.parse_args()
    if args.only != "socket":
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            per = fastshm_loop(args.size, args.count, args.transport, args.loan)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        else:
            per = fastshm_loop(args.size, args.count, args.transport, args.loan)
        kind = "loan" if args.loan else "send"
        print(f"fastshm {kind}+receive+release, {args.size} B, {args.transport}: "
              f"{per * 1e6:.2f} us per message")
    if args.only != "fastshm" and args.size <= 32 * 1024:
        # one thread writes then reads: a frame must fit in the socket's buffer
        per = socket_loop(args.size, args.count, args.transport)
        print(f"raw socket sendall+recv_into, {args.size} B, {args.transport}: "
              f"{per * 1e6:.2f} us per message")


if __name__ == "__main__":
    main()
