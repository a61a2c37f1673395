"""docs/PROTOCOL.md against the implementation: constants, and every layout byte by byte.

The layouts are read from the document's tables (``<!-- layout: NAME -->``),
turned into ``struct`` formats, and used to parse what the implementation
writes: a field moved, resized or renamed on one side only fails here.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastshm import Address, Disconnected, ProtocolError, _core
from fastshm import handshake as H
from fastshm import protocol as P
from fastshm.pool import SlotPool

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
TEXT = DOC.read_text()

TYPES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}


def constants() -> List[Tuple[str, str, object]]:
    rows = re.findall(r"^\| `(\w+)\.(\w+)` \| `([^`]+)` \|$", TEXT, re.M)
    return [(mod, name, ast.literal_eval(value)) for mod, name, value in rows]


def layout(name: str) -> Tuple[struct.Struct, List[str]]:
    """The fixed part of layout ``name`` as a struct, and its field names."""
    start = TEXT.index(f"<!-- layout: {name} -->")
    lines = TEXT[start:].splitlines()[3:]
    fmt, fields, offset = "<", [], 0
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        off, size, typ, field = cells[0], cells[1], cells[2], cells[3]
        if not off.isdigit():
            break  # variable-length tail (offset "30", size "n"...) ends the fixed part
        if not size.isdigit():
            break
        assert int(off) == offset, f"{name}.{field}: offset {off}, expected {offset}"
        if typ in TYPES:
            code = TYPES[typ]
            assert struct.calcsize("<" + code) == int(size), f"{name}.{field}: size"
        else:
            m = re.fullmatch(r"bytes\[(\d+)\]", typ)
            assert m and int(m.group(1)) == int(size), f"{name}.{field}: {typ}"
            code = f"{size}s"
        fmt += code
        fields.append(field)
        offset += int(size)
    return struct.Struct(fmt), fields


def parse(name: str, data: bytes) -> Dict[str, object]:
    s, fields = layout(name)
    return dict(zip(fields, s.unpack_from(data)))


def test_every_documented_constant_matches():
    rows = constants()
    assert len(rows) >= 70
    for mod, name, value in rows:
        module = importlib.import_module(f"fastshm.{mod}")
        assert getattr(module, name) == value, f"fastshm.{mod}.{name}"


def test_every_frame_type_and_error_code_is_documented():
    for ftype, name in P.FRAME_NAMES.items():
        assert re.search(rf"^\| {ftype} \| {name} \|", TEXT, re.M), name
    for code in ("ERR_PROTOCOL", "ERR_VERSION", "ERR_AUTH", "ERR_LIMIT", "ERR_INTERNAL",
                 "ERR_TIMEOUT"):
        value, name = getattr(P, code), code[4:]
        assert re.search(rf"^\| {value} \| {name} \|", TEXT, re.M), code


def test_limits_in_the_prose_table_match():
    limits = TEXT[TEXT.index("## 6. Limits"):TEXT.index("## 7.")]
    for value in (H.PUBLISHER_HANDSHAKE_MAX_BODY, H.SUBSCRIBER_HANDSHAKE_MAX_BODY,
                  H.PUBLISHER_MAX_BODY, _core.DEFAULT_MAX_BODY, H.ADDRESS_MAX_SIZE,
                  _core.RELEASE_MAX_ENTRIES):
        assert f"{value:,}" in limits, value


def frames_on_the_wire(queue) -> bytes:
    a, b = socket.socketpair()
    try:
        stream = _core.Stream(a)
        queue(stream)
        stream.flush(1)
        a.close()
        data = b""
        while chunk := b.recv(1 << 20):
            data += chunk
        return data
    finally:
        a.close()
        b.close()


def test_frame_header_and_release_layouts():
    wire = frames_on_the_wire(lambda s: [s.queue_release(1, 2, 3), s.queue_release(4, 5, 6)])
    head = parse("frame_header", wire)
    assert head == {"magic": 0x5346, "version": 1, "type": P.RELEASE, "length": 8 + 32}
    assert wire[:2] == b"FS"
    body = wire[8:]
    assert parse("release", body) == {"count": 2, "reserved": 0}
    entry, _ = layout("release_entry")
    assert entry.size == _core.RELEASE_ENTRY_SIZE
    assert [parse("release_entry", body[8 + 16 * i:]) for i in range(2)] == [
        {"segment_id": 1, "slot": 2, "generation": 3},
        {"segment_id": 4, "slot": 5, "generation": 6}]


def test_address_layout():
    s, _ = layout("address")
    assert s.size == _core.ADDRESS_FIXED_SIZE
    a = Address(7, 4096, 100, 9, 11, slot=3, timestamp_ns=12345, flags=3, name="fastshm.x",
                meta=b"meta")
    packed = a.pack()
    assert parse("address", packed) == {
        "segment_id": 7, "slot": 3, "offset": 4096, "length": 100, "generation": 9,
        "sequence": 11, "timestamp_ns": 12345, "flags": 3, "name_length": 9, "reserved": 0,
        "meta_length": 4}
    assert packed[56:] == b"fastshm.xmeta"


def test_inline_frame_is_an_address_then_the_payload():
    a = Address(1, 0, 5, 2, 3, flags=_core.FLAG_INLINE, meta=b"m")
    wire = frames_on_the_wire(lambda s: s.queue_inline(a, b"hello"))
    assert parse("frame_header", wire)["type"] == P.INLINE
    assert wire[8:] == a.pack() + b"hello"


def test_hello_segment_reason_layouts():
    body = P.pack_hello(P.Hello(1, 1, 3, 8, b"n" * 16, "cam"))
    assert parse("hello", body) == {"min_version": 1, "max_version": 1, "features": 3,
                                    "window": 8, "nonce": b"n" * 16, "identity_length": 3}
    assert body[layout("hello")[0].size:] == b"cam"
    info = P.SegmentInfo(1, 4, 8192, 4096, 64, 60, "fastshm.abc")
    body = P.pack_segment(info)
    assert parse("segment", body) == {"segment_id": 1, "slot_count": 4, "size": 8192,
                                      "data_offset": 4096, "slot_stride": 64,
                                      "slot_size": 60, "name_length": 11}
    assert body[layout("segment")[0].size:] == b"fastshm.abc"
    body = P.pack_reason(P.ERR_AUTH, "no")
    assert parse("reason", body) == {"code": 3} and body[4:] == b"no"


def test_probe_layouts():
    probe = H.Probe()
    try:
        offer = probe.offer()
        name = probe.name.encode()
        assert parse("probe_head", offer) == {"kind": 1, "a": 32, "b": len(name), "c": 0}
        assert offer[8:] == name
        seg = _core.Segment.open(probe.name)
        try:
            assert seg.size == H.PROBE_SIZE
            fields = parse("probe_segment", seg.read(0, seg.size))
        finally:
            seg.close()
        assert fields == {"magic": b"FSPROBE\0", "reserved": bytes(8), "token": probe.token,
                          "reserved_tail": bytes(16)}
    finally:
        probe.close()
    answer = H.pack_answer(H.PROBE_OK, b"t" * 32)
    assert parse("probe_head", answer) == {"kind": 2, "a": 32, "b": 0, "c": 0}
    answer = H.pack_answer(H.PROBE_NOT_FOUND, b"why")
    assert parse("probe_head", answer) == {"kind": 2, "a": 0, "b": 0, "c": 1}
    assert answer[8:] == b"why"
    result = H.pack_result(H.TRANSPORT_INLINE, 4096)
    assert layout("probe_result")[0].size == len(result) == 16
    assert parse("probe_result", result) == {"kind": 3, "transport": 2, "reserved": 0,
                                             "reserved2": 0, "max_payload": 4096}


def test_segment_header_and_slot_table_layouts():
    pool = SlotPool(1000, 3)
    try:
        slot = pool.acquire()
        raw = pool.segment.read(0, pool.data_offset)
        head = parse("segment_header", raw)
        assert layout("segment_header")[0].size == _core.SEGMENT_HEADER_SIZE
        assert head["magic"] == _core.SEGMENT_MAGIC and head["layout_version"] == 1
        assert (head["header_size"], head["size"], head["slot_count"],
                head["slot_entry_size"], head["slot_size"], head["slot_stride"],
                head["data_offset"]) == (128, pool.segment.size, 3, 64, 1000,
                                         pool.slot_stride, pool.data_offset)
        assert head["owner_pid"] == os.getpid() and head["reserved"] == 0
        assert head["owner_start"] > 0 and head["reserved_tail"] == bytes(40)
        assert pool.data_offset >= 128 + 64 * 3 and pool.slot_stride % 64 == 0
        entry, _ = layout("slot_entry")
        assert entry.size == _core.SLOT_ENTRY_SIZE
        gens = [parse("slot_entry", raw[128 + 64 * i:])["generation"] for i in range(3)]
        assert gens[slot] == 1 and sum(gens) == 1
    finally:
        pool.close()


# --- the codecs never fail except with ProtocolError ------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_control_codecs_survive_random_bytes(data):
    for unpack in (P.unpack_hello, P.unpack_segment, P.unpack_reason, P.unpack_releases):
        try:
            unpack(data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 7), st.integers(0, 2**32 - 1),
       st.binary(min_size=16, max_size=16), st.text(max_size=40))
def test_hello_roundtrips(lo, hi, features, window, nonce, ident):
    if lo > hi:
        lo, hi = hi, lo
    h = P.Hello(lo, hi, features, window, nonce, ident)
    assert P.unpack_hello(P.pack_hello(h)) == h


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([P.PING, P.HELLO, P.BYE, P.RELEASE]),
                          st.binary(max_size=3000)), max_size=12),
       st.lists(st.integers(1, 5000), max_size=20))
def test_the_frame_parser_reassembles_any_split(frames, cuts):
    """Frames cut at arbitrary points come out whole and in order."""
    wire = b"".join(struct.pack("<HBBI", 0x5346, 1, t, len(b)) + b for t, b in frames)
    a, b = socket.socketpair()
    try:
        rx = _core.Stream(b)
        pos, got = 0, []
        for cut in cuts + [len(wire)]:
            chunk = wire[pos:pos + cut]
            pos += len(chunk)
            if chunk:
                a.sendall(chunk)
                while rx.fill(0.5) == 0:
                    pass
            while (f := rx.next_frame()) is not None:
                got.append(f)
            if pos >= len(wire):
                break
        deadline = time.monotonic() + 2
        while len(got) < len(frames) and time.monotonic() < deadline:
            rx.fill(0.05)
            while (f := rx.next_frame()) is not None:
                got.append(f)
        assert got == frames
    finally:
        a.close()
        b.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2000))
def test_the_frame_parser_never_fails_but_with_protocol_error(data, max_inline):
    a, b = socket.socketpair()
    try:
        rx = _core.Stream(b)
        rx.max_body = 100
        rx.max_inline = max_inline
        a.sendall(data)
        a.close()
        try:
            while True:
                if rx.next_frame() is None and rx.fill(0.5) == 0:
                    break
        except ProtocolError:
            pass
        except ConnectionError:  # the end of the data: Disconnected
            pass
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", ["frame_header", "hello", "segment", "address", "release",
                                  "release_entry", "reason", "probe_head", "probe_result",
                                  "segment_header", "slot_entry", "probe_segment"])
def test_every_layout_table_is_well_formed(name):
    s, fields = layout(name)
    assert s.size > 0 and len(set(fields)) == len(fields)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200_000), st.binary(max_size=40)), min_size=1,
                max_size=4),
       st.lists(st.integers(1, 100_000), max_size=12),
       st.binary(min_size=0, max_size=120))
def test_inline_frames_of_any_size_survive_any_split_and_garbage(sizes, cuts, garbage):
    """Large INLINE payloads go to their own buffer; whatever follows is still parsed."""
    frames, wire = [], b""
    for i, (n, meta) in enumerate(sizes):
        addr = Address(1, 0, n, 1, i, flags=_core.FLAG_INLINE, meta=meta)
        payload = bytes([i % 256]) * n
        wire += struct.pack("<HBBI", 0x5346, 1, P.INLINE, len(addr.pack()) + n)
        wire += addr.pack() + payload
        frames.append((addr, payload))
    wire += garbage
    a, b = socket.socketpair()

    def send() -> None:
        pos = 0
        try:
            for cut in cuts + [len(wire)]:
                a.sendall(wire[pos:pos + cut])
                pos += cut
                if pos >= len(wire):
                    break
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader stopped at a protocol error and closed

    sender = threading.Thread(target=send, daemon=True)
    try:
        rx = _core.Stream(b)
        rx.max_inline = 200_000 + H.ADDRESS_MAX_SIZE
        got, error = [], None
        sender.start()
        try:
            while True:
                f = rx.next_frame()
                if f is None:
                    rx.fill(5)
                    continue
                got.append(f)
        except ProtocolError as exc:
            error = exc
        except Disconnected:
            pass
        inline = [(f[1][0], bytes(f[1][1])) for f in got if f[0] == P.INLINE]
        assert inline[:len(frames)] == frames[:len(inline)]
        if error is None and not garbage:
            assert inline == frames
    finally:
        b.close()  # a sender still blocked in sendall gets an error and ends
        sender.join(5)
        a.close()
