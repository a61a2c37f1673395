"""fastshm.Address: the compiled codec checked against a struct twin."""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastshm import Address, ProtocolError, Segment
from fastshm import _core

# The layout in docs/PROTOCOL.md, written independently of the compiled codec.
TWIN = struct.Struct("<IIQQQQQIBBH")
assert TWIN.size == _core.ADDRESS_FIXED_SIZE == 56

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}", fullmatch=True)


def twin_pack(a: Address) -> bytes:
    name = a.name.encode()
    return TWIN.pack(a.segment_id, a.slot, a.offset, a.length, a.generation, a.sequence,
                     a.timestamp_ns, a.flags, len(name), 0, len(a.meta)) + name + a.meta


@st.composite
def addresses(draw):
    offset = draw(u64)
    length = draw(st.integers(0, 2**64 - 1 - offset))
    return Address(draw(u32), offset, length, draw(u64), draw(u64), slot=draw(u32),
                   timestamp_ns=draw(u64), flags=draw(st.sampled_from([0, 1, 2, 3])),
                   name=draw(st.one_of(st.just(""), names)),
                   meta=draw(st.binary(max_size=64)))


@given(addresses())
def test_pack_matches_the_struct_twin_and_roundtrips(a):
    packed = a.pack()
    assert packed == twin_pack(a)
    assert Address.unpack(packed) == a
    assert hash(Address.unpack(packed)) == hash(a)


@given(st.binary(max_size=400))
def test_unpack_never_crashes_on_random_bytes(data):
    try:
        a = Address.unpack(data)
    except ProtocolError:
        return
    assert a.pack() == data


def test_fields_and_repr():
    a = Address(3, 4096, 100, 7, 9, slot=2, timestamp_ns=5, meta=b"m")
    assert (a.segment_id, a.offset, a.length, a.generation, a.sequence, a.slot) == (
        3, 4096, 100, 7, 9, 2)
    assert "offset=4096" in repr(a)
    with pytest.raises(AttributeError):
        a.offset = 1


def test_pickle_roundtrip():
    a = Address(1, 2, 3, 4, 5, name="fastshm.x", meta=b"abc")
    assert pickle.loads(pickle.dumps(a)) == a


@pytest.mark.parametrize("kwargs", [
    dict(segment_id=-1, offset=0, length=0),
    dict(segment_id=2**32, offset=0, length=0),
    dict(segment_id=0, offset=2**64, length=0),
    dict(segment_id=0, offset=2**64 - 1, length=1),
    dict(segment_id=0, offset=0, length=0, flags=0x80),
    dict(segment_id=0, offset=0, length=0, name="a/b"),
    dict(segment_id=0, offset=0, length=0, meta=b"x" * 1025),
])
def test_invalid_fields_are_refused(kwargs):
    with pytest.raises(ValueError):
        Address(**kwargs)


def good() -> bytearray:
    return bytearray(Address(1, 64, 8, 1, 1, name="seg", meta=b"mm").pack())


@pytest.mark.parametrize("corrupt,match", [
    (lambda b: b[:55], "shorter"),
    (lambda b: b + b"x", "header says"),
    (lambda b: b[:53] + b"\x01" + b[54:], "reserved"),
    (lambda b: b[:48] + struct.pack("<I", 0x100) + b[52:], "unknown flags"),
    (lambda b: b[:54] + struct.pack("<H", 2000) + b[56:], "metadata"),
    (lambda b: b[:56] + b"a/c" + b[59:], "forbidden"),
    (lambda b: b[:8] + struct.pack("<QQ", 2**64 - 8, 16) + b[24:], "overflows"),
])
def test_unpack_rejects_bad_bytes(corrupt, match):
    with pytest.raises(ProtocolError, match=match):
        Address.unpack(bytes(corrupt(good())))


def test_dot_names_are_rejected_on_the_wire():
    raw = good()
    raw[56:59] = b"..x"
    Address.unpack(bytes(raw))  # "..x" is a valid name
    short = Address(1, 64, 8, name="ab").pack()
    with pytest.raises(ProtocolError):
        Address.unpack(short[:56] + b"..")


def test_view_is_bounds_checked():
    with Segment.create(4096) as seg:
        seg.write(10, b"abc")
        assert bytes(Address(0, 10, 3, name=seg.name).view(seg)) == b"abc"
        with pytest.raises(IndexError):
            Address(0, 4000, 97).view(seg)


@given(addresses())
def test_the_publishers_fast_constructor_agrees(a):
    if a.name:
        return
    fast = Address._for_slot(a.segment_id, a.slot, a.offset, a.length, a.generation,
                             a.sequence, a.timestamp_ns, a.flags, a.meta)
    assert fast == a and fast.pack() == a.pack()


def test_the_fast_constructor_checks_what_callers_pass():
    with pytest.raises(ValueError):
        Address._for_slot(0, 0, 2**64 - 1, 1, 0, 0, 0, 0, b"")
    with pytest.raises(ValueError):
        Address._for_slot(0, 0, 0, 0, 0, 0, 0, 0x80, b"")
    with pytest.raises(ValueError):
        Address._for_slot(0, 0, 0, 0, 0, 0, 0, 0, b"x" * 1025)
    with pytest.raises(OverflowError):
        Address._for_slot(-1, 0, 0, 0, 0, 0, 0, 0, b"")
