"""fastshm: move large payloads between processes through shared memory.

A writer puts the payload into a POSIX shared-memory segment and sends only
its address over a TCP or Unix socket; the reader maps the segment and reads
the payload in place.

Public names
------------
Segment
    A POSIX shared-memory segment: ``create``, ``open``, ``close``, ``unlink``.
Address
    Where a payload is (segment, offset, length, generation, sequence), with a
    compact wire codec: ``pack`` / ``unpack``.
Publisher, Subscriber, Message
    The route: payloads in slots of a shared pool, addresses on the socket,
    zero-copy messages on the other side.
AsyncPublisher, AsyncSubscriber
    The same for asyncio code (``fastshm.aio``), driven by the event loop's
    readiness callbacks; imported on first use.
FastShmError and its subclasses
    Every error of fastshm's own.
"""

from typing import TYPE_CHECKING, Any

from fastshm._core import Address, Message, Segment
from fastshm.errors import (
    AuthenticationError,
    Disconnected,
    FastShmError,
    Full,
    GenerationError,
    ProtocolError,
)
from fastshm.net import Publisher, Subscriber, parse_url
from fastshm.pool import segment_size

if TYPE_CHECKING:
    from fastshm.aio import AsyncPublisher, AsyncSubscriber

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AsyncPublisher",
    "AsyncSubscriber",
    "AuthenticationError",
    "Disconnected",
    "FastShmError",
    "Full",
    "GenerationError",
    "Message",
    "ProtocolError",
    "Publisher",
    "Segment",
    "Subscriber",
    "parse_url",
    "segment_size",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The asyncio API is imported when it is first used: `import fastshm` does not
    # import asyncio.
    if name in ("AsyncPublisher", "AsyncSubscriber"):
        from fastshm import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'fastshm' has no attribute {name!r}")
