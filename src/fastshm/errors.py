"""Exceptions raised by fastshm.

Every error of fastshm's own derives from :class:`FastShmError`; each also
derives from the builtin exception it is, so ``except ValueError`` or
``except TimeoutError`` keep working in code that does not know fastshm.
Operating-system failures (a segment that does not exist, a permission
problem, a full ``/dev/shm``) are raised as the builtin :class:`OSError`
subclasses, carrying the segment name.
"""

from __future__ import annotations

__all__ = [
    "FastShmError",
    "ProtocolError",
    "Full",
    "Disconnected",
    "GenerationError",
    "AuthenticationError",
]


class FastShmError(Exception):
    """Base class of every error that fastshm itself raises."""


class ProtocolError(FastShmError, ValueError):
    """Bytes from a peer or a buffer do not follow the fastshm wire format."""


class Full(FastShmError, TimeoutError):
    """No slot became free before the timeout: subscribers hold them all."""


class Disconnected(FastShmError, ConnectionError):
    """The peer closed the connection or went away."""


class GenerationError(FastShmError, LookupError):
    """An address names a slot whose generation has changed: stale or forged."""


class AuthenticationError(FastShmError, PermissionError):
    """The peer did not prove knowledge of the shared secret."""
