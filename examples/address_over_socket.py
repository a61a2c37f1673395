"""The plain path: a segment, an Address, and any connected socket.

The writer creates a segment, writes a frame into it and sends only the
frame's packed Address (a few dozen bytes) through a socket; the reader opens
the segment read-only and gets a zero-copy, bounds-checked view.  Run it:

    python examples/address_over_socket.py
"""

import os
import socket
import struct

import fastshm

FRAME = os.urandom(1920 * 1080 * 3)


def writer(conn: socket.socket) -> fastshm.Segment:
    seg = fastshm.Segment.create(len(FRAME))          # /dev/shm/fastshm.<random>, mode 0600
    seg.write(0, FRAME)                               # one copy, GIL released
    packed = fastshm.Address(0, 0, len(FRAME), name=seg.name).pack()
    conn.sendall(struct.pack("<H", len(packed)) + packed)   # a length prefix frames it
    return seg                                        # keep it until the reader is done


def reader(conn: socket.socket) -> bytes:
    (n,) = struct.unpack("<H", conn.recv(2, socket.MSG_WAITALL))
    address = fastshm.Address.unpack(conn.recv(n, socket.MSG_WAITALL))
    with fastshm.Segment.open(address.name) as seg:   # read-only mapping
        with address.view(seg) as view:               # zero-copy memoryview
            return bytes(view[:16])


if __name__ == "__main__":
    a, b = socket.socketpair()
    with writer(a):                                   # leaving the block unlinks it
        head = reader(b)
    assert head == FRAME[:16]
    print(f"read {len(FRAME)} bytes in place; first bytes {head.hex()}")
    a.close()
    b.close()
