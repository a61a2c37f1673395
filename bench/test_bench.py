"""The benchmarks: latency (ping-pong), streaming, and the memcpy limit.

Timing is pytest-benchmark's, in pedantic mode: the consumer process is started and one
message exchanged before anything is timed; a warm-up then picks the iterations per round so
that a round lasts about the profile's ``round_time``; the garbage collector is off while
rounds run. Nothing here asserts a time: a test fails only when a message arrives wrong
(the consumer checks every one) or a process misbehaves.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from bench import harness
from bench.conftest import Profile, size_id


def _config(system: type, size: int, mode: str, kind: str, window: int, ack_every: int,
            consumer_cpus: set[int] | None, profile: Profile) -> harness.Config:
    return harness.Config(
        system=f"{system.__module__}:{system.__qualname__}",
        size=size,
        mode=mode,
        kind=kind,
        window=window,
        ack_every=ack_every,
        base_fold=harness.xor_fold(harness.pattern(size)),
        workdir=harness.RESOURCES.workdir(),
        consumer_cpus=consumer_cpus,
        timeout=profile.timeout,
    )


def _skip_unavailable(system: type) -> None:
    reason = system.unavailable()
    if reason:
        pytest.skip(reason)


def _pedantic(benchmark, fn, profile: Profile, iterations: int) -> None:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        benchmark.pedantic(fn, rounds=profile.rounds, iterations=iterations,
                           warmup_rounds=profile.warmup_rounds)
    finally:
        if was_enabled:
            gc.enable()


def _common_info(benchmark, system: type, size: int, placement: str,
                 producer: set[int] | None, consumer: set[int] | None) -> None:
    benchmark.extra_info.update(
        system=system.name if hasattr(system, "name") else str(system),
        role=getattr(system, "role", "limit"),
        transport=getattr(system, "transport", ""),
        size=size,
        placement=placement,
        producer_cpus=sorted(producer) if producer else None,
        consumer_cpus=sorted(consumer) if consumer else None,
    )


def test_latency(benchmark, profile: Profile, system: type, size: int, mode: str,
                 placement: str) -> None:
    """One ping-pong: payload one way, 1-byte ack back; one-way latency = median / 2."""
    _skip_unavailable(system)
    producer, consumer = harness.placement_cpus(placement)
    cfg = _config(system, size, mode, "latency", 1, 1, consumer, profile)
    benchmark.group = f"latency {mode} {placement} {size_id(size)}"
    session = harness.Session(system, cfg, producer)
    with session:
        session.arm(profile.timeout * 4)
        fn = session.latency_target()
        per_call = harness.calibrate(fn, profile.warmup_time, 2)
        iterations = max(1, min(100_000, round(profile.round_time / max(per_call, 1e-9))))
        _pedantic(benchmark, fn, profile, iterations)
    assert not session.errors, session.errors
    _common_info(benchmark, system, size, placement, producer, consumer)
    benchmark.extra_info.update(kind="latency", mode=mode, messages_per_call=1)


def test_stream(benchmark, profile: Profile, system: type, size: int, placement: str) -> None:
    """N messages back to back, at most ``window`` in flight, the consumer touching each."""
    _skip_unavailable(system)
    producer, consumer = harness.placement_cpus(placement)
    window = harness.stream_window(size)
    ack_every = max(1, window // 2)
    cfg = _config(system, size, "touch", "stream", window, ack_every, consumer, profile)
    benchmark.group = f"stream {placement} {size_id(size)}"
    session = harness.Session(system, cfg, producer)
    with session:
        session.arm(profile.timeout * 4)
        n0 = 2 * window
        per_msg = harness.calibrate(session.stream_target(n0), profile.warmup_time, 2) / n0
        n = round(profile.stream_round_time / max(per_msg, 1e-9))
        n = max(n0, min(1_000_000, n))
        n += -n % ack_every
        _pedantic(benchmark, session.stream_target(n), profile, 1)
    assert not session.errors, session.errors
    _common_info(benchmark, system, size, placement, producer, consumer)
    benchmark.extra_info.update(kind="stream", mode="touch", messages_per_call=n,
                                window=window, ack_every=ack_every)


class Memcpy:
    name = "memcpy"
    role = "limit"
    transport = ""


def test_memcpy(benchmark, profile: Profile, size: int) -> None:
    """The limit: one copy of the payload between preallocated arrays (numpy.copyto)."""
    # page-aligned, like a shared-memory slot: a malloc'ed pair can sit a few bytes apart
    # modulo 4 KiB, which makes this CPU's `rep movsb` several times slower (seen at 64 KiB)
    src = harness.aligned_empty(size)
    src[:] = harness.pattern(size)
    dst = harness.aligned_empty(size)
    producer, _ = harness.placement_cpus("same" if len(harness.cpus()) else "none")
    benchmark.group = f"memcpy {size_id(size)}"
    with harness.pinned(producer):

        def copy() -> None:
            np.copyto(dst, src)

        per_call = harness.calibrate(copy, profile.warmup_time, 2)
        iterations = max(1, min(100_000, round(profile.round_time / max(per_call, 1e-9))))
        _pedantic(benchmark, copy, profile, iterations)
    assert np.array_equal(src, dst)
    _common_info(benchmark, Memcpy, size, "one process", producer, None)
    benchmark.extra_info.update(kind="memcpy", mode="copy", messages_per_call=1)
