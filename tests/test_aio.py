"""The asyncio API: AsyncPublisher and AsyncSubscriber, driven by the event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest

import fastshm
from fastshm import AsyncPublisher, AsyncSubscriber, Disconnected, Full
from fastshm._core import buffers_equal
from fastshm.demo import expected_frame, pattern

SIZE = 64 * 1024
TIMEOUT = 30.0


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_public_names():
    assert {"AsyncPublisher", "AsyncSubscriber"} <= set(fastshm.__all__)
    assert fastshm.AsyncPublisher is AsyncPublisher


def test_send_receive_and_async_for(route):
    base = pattern(SIZE)

    async def main() -> List[int]:
        async with AsyncPublisher(route, slot_size=SIZE, slots=4) as pub:
            async with AsyncSubscriber(pub.url, connect_timeout=TIMEOUT) as sub:
                assert await pub.wait_for_subscribers(1, timeout=TIMEOUT) == 1

                async def produce() -> None:
                    for seq in range(1, 41):
                        assert await pub.send(expected_frame(base, seq, SIZE)) == 1
                    pub.close()  # says goodbye: the `async for` below ends

                producer = asyncio.ensure_future(produce())
                seqs = []
                async for msg in sub:
                    with msg:
                        assert msg.nbytes == SIZE
                        assert buffers_equal(msg, expected_frame(base, msg.seq, SIZE))
                        seqs.append(msg.seq)
                await producer
                return seqs

    assert run(main()) == list(range(1, 41))


def test_receive_with_a_timeout_returns_none(route):
    async def main() -> None:
        async with AsyncPublisher(route, slot_size=SIZE) as pub:
            async with AsyncSubscriber(pub.url) as sub:
                await pub.wait_for_subscribers(1, timeout=TIMEOUT)
                start = time.monotonic()
                assert await sub.receive(timeout=0.1) is None
                assert time.monotonic() - start >= 0.09
                await pub.send(b"x" * 10)
                msg = await sub.receive(timeout=TIMEOUT)
                assert msg is not None and bytes(msg) == b"x" * 10
                msg.release()

    run(main())


def test_send_waits_for_a_release_without_blocking_the_loop():
    async def main() -> None:
        async with AsyncPublisher("tcp://127.0.0.1:0", slot_size=SIZE, slots=2) as pub:
            async with AsyncSubscriber(pub.url) as sub:
                await pub.wait_for_subscribers(1, timeout=TIMEOUT)
                await pub.send(b"1")
                await pub.send(b"2")
                held = [await sub.receive(), await sub.receive()]
                # Both slots are held: the third send waits, the loop keeps running.
                ticks = 0

                async def tick() -> None:
                    nonlocal ticks
                    while True:
                        ticks += 1
                        await asyncio.sleep(0.01)

                ticker = asyncio.ensure_future(tick())
                sending = asyncio.ensure_future(pub.send(b"3"))
                receiving = asyncio.ensure_future(sub.receive())
                await asyncio.sleep(0.2)
                assert not sending.done() and not receiving.done()
                assert ticks >= 3  # the loop ran while the send waited
                # Let one go while the subscriber is waiting for the next frame: the
                # release reaches the publisher, the send completes, the frame arrives.
                first = held.pop(0)
                assert first is not None
                first.release()
                assert await sending == 1
                third = await receiving
                assert third is not None and bytes(third) == b"3"
                third.release()
                for msg in held:
                    assert msg is not None
                    msg.release()
                ticker.cancel()

    run(main())


def test_send_raises_full_after_its_timeout():
    async def main() -> None:
        async with AsyncPublisher("tcp://127.0.0.1:0", slot_size=SIZE, slots=1) as pub:
            async with AsyncSubscriber(pub.url) as sub:
                await pub.wait_for_subscribers(1, timeout=TIMEOUT)
                await pub.send(b"a")
                msg = await sub.receive()
                with pytest.raises(Full):
                    await pub.send(b"b", timeout=0.1)
                assert msg is not None
                msg.release()

    run(main())


def test_wait_for_subscribers_times_out():
    async def main() -> None:
        async with AsyncPublisher("tcp://127.0.0.1:0", slot_size=SIZE) as pub:
            with pytest.raises(TimeoutError):
                await pub.wait_for_subscribers(1, timeout=0.1)
            assert pub.subscribers == 0

    run(main())


def test_receive_before_connect_is_an_error():
    async def main() -> None:
        sub = AsyncSubscriber("tcp://127.0.0.1:9")
        with pytest.raises(ValueError):
            await sub.receive()

    run(main())


def test_a_vanished_publisher_is_an_error_not_the_end():
    async def main() -> None:
        pub = fastshm.Publisher("tcp://127.0.0.1:0", slot_size=SIZE)
        try:
            sub = AsyncSubscriber(pub.url)
            # The blocking publisher is served from a thread while the loop finishes the
            # subscriber's handshake (it takes round trips).
            waiting = asyncio.get_running_loop().run_in_executor(
                None, pub.wait_for_subscribers, 1, TIMEOUT)
            await sub.connect()
            await waiting
            # Close the publisher's sockets without a goodbye, as a crash would.
            for peer in list(pub._peers.values()):
                peer.sock.shutdown(2)
            with pytest.raises(Disconnected):
                async for _ in sub:
                    pass
            sub.close()
        finally:
            pub.close()

    run(main())


def test_async_subscriber_reads_the_writer_entrypoint(tmp_path):
    """A module with its own loop reads frames from fastshm-writer in another process."""
    url = f"unix://{tmp_path / 'route.sock'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSHM_", "IOTEDGE_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), FASTSHM_URL=url,
               FASTSHM_SLOT_SIZE=str(SIZE), FASTSHM_RATE="200",
               FASTSHM_CHANNEL=f"aiotest{os.getpid()}")
    threads = threading.active_count()
    writer = subprocess.Popen([sys.executable, "-m", "fastshm.edge", "writer"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def main() -> List[int]:
            base = pattern(SIZE)
            seqs: List[int] = []
            async with AsyncSubscriber(url, connect_timeout=TIMEOUT) as sub:
                async for msg in sub:
                    with msg:
                        assert buffers_equal(msg, expected_frame(base, msg.seq, SIZE))
                        seqs.append(msg.seq)
                    if len(seqs) == 10:
                        writer.send_signal(signal.SIGTERM)  # it says goodbye: the loop ends
            return seqs

        seqs = run(main())
        assert len(seqs) >= 10 and seqs == sorted(seqs)
        assert writer.wait(TIMEOUT) == 0
        assert threading.active_count() == threads  # no thread left behind
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        assert writer.stderr is not None
        writer.stderr.close()


def test_own_loop_example(tmp_path):
    """examples/iotedge/own_loop.py reads frames from the writer entrypoint."""
    example = Path(__file__).resolve().parents[1] / "examples" / "iotedge" / "own_loop.py"
    if not example.exists():
        pytest.skip("not running from a source checkout")
    url = f"unix://{tmp_path / 'route.sock'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSHM_", "IOTEDGE_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), FASTSHM_URL=url)
    writer = subprocess.Popen(
        [sys.executable, "-m", "fastshm.edge", "writer"],
        env=dict(env, FASTSHM_SLOT_SIZE="4096", FASTSHM_RATE="0", FASTSHM_COUNT="5",
                 FASTSHM_WAIT_SUBSCRIBERS="1", FASTSHM_CHANNEL=f"aiotest{os.getpid()}x"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = subprocess.run([sys.executable, str(example)], env=dict(env, FASTSHM_COUNT="5"),
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == [f"frame {i}" for i in range(1, 6)]
        assert writer.wait(TIMEOUT) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
