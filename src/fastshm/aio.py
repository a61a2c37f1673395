"""asyncio API: :class:`AsyncPublisher` and :class:`AsyncSubscriber`.

Both wrap the blocking classes and are driven by the event loop's readiness
callbacks (``loop.add_reader`` on their ``fileno()``), not by a thread per
socket: the publisher's descriptor is readable when it has work (a subscriber
connecting, releases coming back), the subscriber's when a frame arrived.

>>> async with AsyncPublisher("tcp://127.0.0.1:5555", slot_size=6_220_800) as pub:
...     await pub.wait_for_subscribers(1, timeout=10)
...     await pub.send(frame)

>>> async with AsyncSubscriber("tcp://127.0.0.1:5555") as sub:
...     async for msg in sub:
...         with msg:
...             await process(memoryview(msg))

Copies into shared memory happen in the loop's thread, with the GIL released:
a 6 MB frame holds the loop for about as long as one ``memcpy`` of it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Optional, Set

from .errors import Disconnected, Full
from .net import Publisher, Subscriber
from ._core import Message

__all__ = ["AsyncPublisher", "AsyncSubscriber"]

log = logging.getLogger("fastshm")

# While a subscriber waits for a frame, releases of messages let go meanwhile are
# sent at least this often (a release is queued, and goes out with the next read).
_RELEASE_FLUSH = 0.05


def _left(loop: asyncio.AbstractEventLoop, deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - loop.time()


class AsyncPublisher:
    """A :class:`~fastshm.Publisher` for asyncio code.

    Takes the same arguments as :class:`~fastshm.Publisher` and creates one at
    once (binding the route and creating the segment do not block). It is served
    by the running loop from the first ``await`` on it, or ``async with``, until
    :meth:`close`.

    Parameters
    ----------
    url : str
        Where to listen: ``tcp://host:port`` or ``unix:///path``.
    **kwargs
        ``slot_size``, ``slots``, ``channel``, ... as for :class:`~fastshm.Publisher`.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._pub = Publisher(url, **kwargs)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._waiters: Set["asyncio.Future[None]"] = set()

    @property
    def publisher(self) -> Publisher:
        """The blocking publisher underneath (for ``stats()``, ``segment_name``...)."""
        return self._pub

    @property
    def url(self) -> str:
        """The URL subscribers connect to."""
        return self._pub.url

    @property
    def subscribers(self) -> int:
        """How many subscribers are connected and past the handshake."""
        return self._pub.subscribers

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._pub.closed:
            raise ValueError("publisher is closed")
        if self._loop is None:
            loop.add_reader(self._pub.fileno(), self._on_readable)
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("AsyncPublisher is served by another event loop")
        return loop

    def _on_readable(self) -> None:
        try:
            self._pub.poll(0)
        except Exception:  # never let a bad peer stop the loop's callback
            log.exception("serving %s failed", self._pub.url)
        self._wake()

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def _wait(self, loop: asyncio.AbstractEventLoop, timeout: Optional[float]) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)

    async def send(self, data: Any, timeout: Optional[float] = None, *, meta: bytes = b"") -> int:
        """Copy ``data`` into a free slot and send its address to every subscriber.

        Waits without blocking the loop while subscribers hold every slot.

        Returns
        -------
        int
            How many subscribers the message was sent to.

        Raises
        ------
        Full
            If no slot became free within ``timeout`` seconds.
        ValueError
            If the payload is larger than a slot, or the publisher is closed.
        """
        loop = self._attach()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            try:
                return self._pub.send(data, timeout=0, meta=meta)
            except Full:
                left = _left(loop, deadline)
                if left is not None and left <= 0:
                    raise Full(f"no free slot within {timeout} s") from None
            await self._wait(loop, left)

    async def wait_for_subscribers(self, n: int = 1, timeout: Optional[float] = None) -> int:
        """Wait until ``n`` subscribers are connected; return how many are.

        Raises
        ------
        TimeoutError
            If fewer than ``n`` connected within ``timeout`` seconds.
        """
        loop = self._attach()
        deadline = None if timeout is None else loop.time() + timeout
        self._pub.poll(0)
        while self._pub.subscribers < n:
            left = _left(loop, deadline)
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"{self._pub.subscribers} of {n} subscriber(s) connected to {self.url} "
                    f"within {timeout} s")
            await self._wait(loop, left)
        return self._pub.subscribers

    def close(self) -> None:
        """Stop serving, say goodbye to subscribers and unlink the segment."""
        if self._loop is not None:
            if not self._pub.closed:
                self._loop.remove_reader(self._pub.fileno())
            self._loop = None
        self._pub.close()
        self._wake()

    async def aclose(self) -> None:
        """:meth:`close`, as a coroutine."""
        self.close()

    async def __aenter__(self) -> "AsyncPublisher":
        self._attach()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fastshm.AsyncPublisher {self._pub!r}>"


class AsyncSubscriber:
    """A :class:`~fastshm.Subscriber` for asyncio code.

    ``async with AsyncSubscriber(url) as sub`` connects; so does
    :meth:`connect`. Then ``await sub.receive()`` or ``async for msg in sub``.

    Parameters
    ----------
    url : str
        The publisher's route.
    **kwargs
        ``connect_timeout``, ``identity``, ... as for :class:`~fastshm.Subscriber`.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._url = url
        self._kwargs = kwargs
        self._sub: Optional[Subscriber] = None
        self._lock: Optional[asyncio.Lock] = None

    @classmethod
    def from_subscriber(cls, sub: Subscriber) -> "AsyncSubscriber":
        """Wrap a connected :class:`~fastshm.Subscriber`."""
        self = cls(sub.url)
        self._sub = sub
        return self

    @property
    def subscriber(self) -> Optional[Subscriber]:
        """The blocking subscriber underneath, once connected."""
        return self._sub

    @property
    def url(self) -> str:
        """The publisher's route."""
        return self._url

    async def connect(self) -> "AsyncSubscriber":
        """Connect to the publisher and finish the handshake (within ``connect_timeout``).

        Raises
        ------
        TimeoutError
            If no publisher answered in time.
        """
        if self._sub is None:
            # Subscriber() connects with blocking calls and retries while the publisher
            # is not there yet: run that once, off the loop. Reading and releasing
            # afterwards are driven by the loop alone.
            loop = asyncio.get_running_loop()
            kwargs = self._kwargs
            sub = await loop.run_in_executor(None, lambda: Subscriber(self._url, **kwargs))
            self._sub = sub
            # The handshake takes round trips (HELLO, AUTH, PROBE): drive it from the loop,
            # which meanwhile serves a publisher living in the same loop.
            timeout = kwargs.get("connect_timeout", 10.0)
            deadline = None if timeout is None else loop.time() + timeout
            while not sub.ready:
                try:
                    sub.wait_ready(0)
                except TimeoutError:
                    left = _left(loop, deadline)
                    if left is not None and left <= 0:
                        raise TimeoutError(f"publisher at {self._url} did not finish the "
                                           f"handshake within {timeout} s") from None
                    await self._readable(loop, sub, 0.05 if left is None else min(left, 0.05))
        return self

    def _ready_sub(self) -> Subscriber:
        if self._sub is None:
            raise ValueError("not connected: use 'async with' or 'await connect()' first")
        return self._sub

    async def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Return the next message, or ``None`` if none came within ``timeout`` seconds.

        Raises
        ------
        Disconnected
            When the publisher closed the route or went away.
        """
        sub = self._ready_sub()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one waiter per descriptor
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                msg = sub.receive(timeout=0)
                if msg is not None:
                    return msg
                left = _left(loop, deadline)
                if left is not None and left <= 0:
                    return None
                await self._readable(loop, sub, _RELEASE_FLUSH if left is None else min(left, _RELEASE_FLUSH))

    async def _readable(self, loop: asyncio.AbstractEventLoop, sub: Subscriber, timeout: float) -> None:
        fd = sub.fileno()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        """The next message; the iteration ends when the publisher closes the route."""
        while True:
            try:
                msg = await self.receive()
            except Disconnected:
                # A publisher that said goodbye ends the iteration, as in the blocking
                # API; one that vanished is an error.
                if self._sub is not None and self._sub.said_goodbye:
                    raise StopAsyncIteration from None
                raise
            if msg is not None:
                return msg

    def close(self) -> None:
        """Give back released slots, say goodbye and disconnect."""
        if self._sub is not None:
            self._sub.close()

    async def aclose(self) -> None:
        """:meth:`close`, as a coroutine."""
        self.close()

    async def __aenter__(self) -> "AsyncSubscriber":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fastshm.AsyncSubscriber {self._url}{'' if self._sub else ' not connected'}>"
