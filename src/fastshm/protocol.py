"""Wire protocol v1: frame types, limits and the control-frame codecs.

The frame header, ADDRESS and RELEASE frames are packed by the compiled core
(they are the hot path); the rarer control frames are packed here.
``docs/PROTOCOL.md`` is the normative description of every byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fastshm import _core
from fastshm.errors import ProtocolError

__all__ = [
    "WIRE_VERSION", "MIN_VERSION", "MAX_VERSION",
    "HELLO", "AUTH", "SEGMENT", "ADDRESS", "INLINE", "RELEASE", "CREDIT",
    "PING", "PONG", "BYE", "ERROR", "PROBE",
    "FEATURE_SHM", "FEATURE_INLINE", "FEATURE_AUTH",
    "Hello", "SegmentInfo", "pack_hello", "unpack_hello", "pack_segment", "unpack_segment",
    "pack_reason", "unpack_reason", "unpack_releases",
    "ERR_PROTOCOL", "ERR_VERSION", "ERR_AUTH", "ERR_LIMIT", "ERR_INTERNAL", "ERR_TIMEOUT",
    "BYE_CLOSING", "FRAME_NAMES",
]

WIRE_VERSION = _core.WIRE_VERSION
MIN_VERSION = 1
MAX_VERSION = 1

HELLO = _core.HELLO
AUTH = _core.AUTH
SEGMENT = _core.SEGMENT
ADDRESS = _core.ADDRESS
INLINE = _core.INLINE
RELEASE = _core.RELEASE
CREDIT = _core.CREDIT
PING = _core.PING
PONG = _core.PONG
BYE = _core.BYE
ERROR = _core.ERROR
PROBE = _core.PROBE

FRAME_NAMES = {
    HELLO: "HELLO", AUTH: "AUTH", SEGMENT: "SEGMENT", ADDRESS: "ADDRESS", INLINE: "INLINE",
    RELEASE: "RELEASE", CREDIT: "CREDIT", PING: "PING", PONG: "PONG", BYE: "BYE",
    ERROR: "ERROR", PROBE: "PROBE",
}

#: Feature bits a HELLO may offer.
FEATURE_SHM = 0x1
FEATURE_INLINE = 0x2
FEATURE_AUTH = 0x4

#: ERROR and BYE reason codes.
BYE_CLOSING = 0
ERR_PROTOCOL = 1
ERR_VERSION = 2
ERR_AUTH = 3
ERR_LIMIT = 4
ERR_INTERNAL = 5
ERR_TIMEOUT = 6

_HELLO = struct.Struct("<HHII16sH")
_SEGMENT = struct.Struct("<IIQQQQH")
_REASON = struct.Struct("<I")
_RELEASE_HEAD = struct.Struct("<II")
_RELEASE_ENTRY = struct.Struct("<IIQ")

MAX_IDENTITY = 255


@dataclass(frozen=True)
class Hello:
    """A HELLO frame: the versions and features a peer speaks, and who it is."""

    min_version: int
    max_version: int
    features: int
    window: int
    nonce: bytes
    identity: str


def pack_hello(hello: Hello) -> bytes:
    """Pack a HELLO body."""
    ident = hello.identity.encode("utf-8")[:MAX_IDENTITY]
    return _HELLO.pack(hello.min_version, hello.max_version, hello.features, hello.window,
                       hello.nonce, len(ident)) + ident


def unpack_hello(body: bytes) -> Hello:
    """Parse a HELLO body; raise :class:`ProtocolError` if it is malformed."""
    if len(body) < _HELLO.size:
        raise ProtocolError(f"HELLO of {len(body)} bytes is shorter than {_HELLO.size}")
    lo, hi, features, window, nonce, n = _HELLO.unpack_from(body)
    if len(body) != _HELLO.size + n:
        raise ProtocolError("HELLO length does not match its identity length")
    if lo == 0 or lo > hi:
        raise ProtocolError(f"HELLO offers an empty version range {lo}..{hi}")
    try:
        ident = body[_HELLO.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("HELLO identity is not UTF-8") from None
    return Hello(lo, hi, features, window, nonce, ident)


@dataclass(frozen=True)
class SegmentInfo:
    """A SEGMENT frame: a pool segment the publisher announces, and its geometry."""

    segment_id: int
    slot_count: int
    size: int
    data_offset: int
    slot_stride: int
    slot_size: int
    name: str


def pack_segment(info: SegmentInfo) -> bytes:
    """Pack a SEGMENT body."""
    name = info.name.encode("ascii")
    return _SEGMENT.pack(info.segment_id, info.slot_count, info.size, info.data_offset,
                         info.slot_stride, info.slot_size, len(name)) + name


def unpack_segment(body: bytes) -> SegmentInfo:
    """Parse a SEGMENT body; raise :class:`ProtocolError` if it is malformed."""
    if len(body) < _SEGMENT.size:
        raise ProtocolError(f"SEGMENT of {len(body)} bytes is shorter than {_SEGMENT.size}")
    sid, count, size, data_offset, stride, slot_size, n = _SEGMENT.unpack_from(body)
    if len(body) != _SEGMENT.size + n:
        raise ProtocolError("SEGMENT length does not match its name length")
    try:
        name = _core.check_name(body[_SEGMENT.size:].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"SEGMENT announces an invalid name: {exc}") from None
    return SegmentInfo(sid, count, size, data_offset, stride, slot_size, name)


def pack_reason(code: int, text: str) -> bytes:
    """Pack a BYE or ERROR body: a code and a UTF-8 reason."""
    return _REASON.pack(code) + text.encode("utf-8")[:1024]


def unpack_reason(body: bytes) -> tuple[int, str]:
    """Parse a BYE or ERROR body into ``(code, text)``."""
    if len(body) < _REASON.size:
        raise ProtocolError("BYE/ERROR frame is shorter than its code")
    (code,) = _REASON.unpack_from(body)
    return code, body[_REASON.size:].decode("utf-8", "replace")


def unpack_releases(body: bytes) -> list[tuple[int, int, int]]:
    """Parse a RELEASE body into ``(segment_id, slot, generation)`` triples."""
    if len(body) < _RELEASE_HEAD.size:
        raise ProtocolError("RELEASE frame is shorter than its header")
    count, reserved = _RELEASE_HEAD.unpack_from(body)
    if reserved != 0 or len(body) != _RELEASE_HEAD.size + count * _RELEASE_ENTRY.size:
        raise ProtocolError("RELEASE length does not match its count")
    return list(_RELEASE_ENTRY.iter_unpack(memoryview(body)[_RELEASE_HEAD.size:]))
