"""pytest options and fixtures of the benchmark suite.

Profiles (the first that applies wins):

``--bench-smoke`` or ``FASTSHM_BENCH_SMOKE=1``
    for CI: 64 B and 64 KiB, one placement, two short rounds; proves every benchmark still
    runs (and that every message arrives intact), asserts no timing.
``--bench-quick`` or ``FASTSHM_BENCH_QUICK=1``
    about a minute: 64 B, 64 KiB and 6.2 MB, cross-core only, touch latency and streaming.
default
    the full matrix: six sizes, touch/full latency and streaming, cross- and same-core.

``--bench-systems``, ``--bench-sizes``, ``--bench-placements`` and ``--bench-kinds`` (comma
lists) narrow any profile, e.g. ``--bench-systems tcp,fastshm-tcp --bench-sizes 64``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import signal
import sys

import pytest

from bench import harness
from bench.systems import SYSTEMS


@dataclasses.dataclass
class Profile:
    name: str
    sizes: tuple[int, ...]
    placements: tuple[str, ...]
    kinds: tuple[str, ...]  # "touch", "full" (latency) and "stream"
    rounds: int
    warmup_rounds: int
    warmup_time: float  # seconds of warm-up before the iterations are chosen
    round_time: float  # a latency round lasts about this long
    stream_round_time: float  # a streaming round lasts about this long
    timeout: float  # a test whose consumer hangs this long fails


def _flag(config: pytest.Config, option: str, env: str) -> bool:
    return bool(config.getoption(option)) or os.environ.get(env, "") not in ("", "0")


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastshm-bench", "fastshm benchmarks")
    group.addoption("--bench-smoke", action="store_true", help="tiny counts and sizes, for CI")
    group.addoption("--bench-quick", action="store_true", help="a run of about a minute")
    group.addoption("--bench-systems", default=None, help="comma list of systems to run")
    group.addoption("--bench-sizes", default=None, help="comma list of payload sizes in bytes")
    group.addoption("--bench-placements", default=None, help="comma list of cross,same,none")
    group.addoption("--bench-kinds", default=None, help="comma list of touch,full,stream")


def make_profile(config: pytest.Config) -> Profile:
    placements = harness.available_placements()
    if _flag(config, "--bench-smoke", "FASTSHM_BENCH_SMOKE"):
        prof = Profile("smoke", harness.SMOKE_SIZES, placements[:1], ("touch", "full", "stream"),
                       rounds=2, warmup_rounds=0, warmup_time=0.0, round_time=0.0005,
                       stream_round_time=0.001, timeout=30.0)
    elif _flag(config, "--bench-quick", "FASTSHM_BENCH_QUICK"):
        prof = Profile("quick", harness.QUICK_SIZES, placements[:1], ("touch", "stream"),
                       rounds=5, warmup_rounds=1, warmup_time=0.03, round_time=0.01,
                       stream_round_time=0.02, timeout=60.0)
    else:
        prof = Profile("full", harness.SIZES, tuple(p for p in placements if p != "none"),
                       ("touch", "full", "stream"), rounds=15, warmup_rounds=1,
                       warmup_time=0.1, round_time=0.02, stream_round_time=0.05, timeout=120.0)
    sizes = _csv(config.getoption("--bench-sizes"))
    if sizes:
        prof.sizes = tuple(int(s) for s in sizes)
    placements_opt = _csv(config.getoption("--bench-placements"))
    if placements_opt:
        bad = set(placements_opt) - set(harness.available_placements())
        if bad:
            raise pytest.UsageError(f"placement not available here: {sorted(bad)}")
        prof.placements = tuple(placements_opt)
    kinds = _csv(config.getoption("--bench-kinds"))
    if kinds:
        prof.kinds = tuple(kinds)
    return prof


def selected_systems(config: pytest.Config) -> list[type]:
    names = _csv(config.getoption("--bench-systems"))
    if not names:
        return list(SYSTEMS)
    known = {cls.name: cls for cls in SYSTEMS}
    unknown = [n for n in names if n not in known and n != "memcpy"]
    if unknown:
        raise pytest.UsageError(f"unknown systems {unknown}; known: {sorted(known)} and memcpy")
    return [known[n] for n in names if n in known]


def size_id(size: int) -> str:
    for unit, factor in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    config._bench_profile = make_profile(config)  # type: ignore[attr-defined]
    config._bench_load_start = os.getloadavg()  # type: ignore[attr-defined]
    # a terminated run (CI timeout, `timeout`, kill) still stops its consumers and removes
    # its files and segments: pytest unwinds a KeyboardInterrupt through every finally
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    prof: Profile = metafunc.config._bench_profile  # type: ignore[attr-defined]
    fn = metafunc.function.__name__
    systems = selected_systems(metafunc.config)
    wanted_memcpy = not _csv(metafunc.config.getoption("--bench-systems")) or "memcpy" in (
        _csv(metafunc.config.getoption("--bench-systems")) or []
    )
    params = []
    if fn == "test_latency":
        for placement in prof.placements:
            for mode in ("touch", "full"):
                if mode not in prof.kinds:
                    continue
                for size in prof.sizes:
                    for cls in systems:
                        if "latency" in cls.kinds and mode in cls.modes and (
                            cls.sizes is None or size in cls.sizes
                        ):
                            params.append(pytest.param(cls, size, mode, placement,
                                          id=f"{placement}-{mode}-{size_id(size)}-{cls.name}"))
        metafunc.parametrize("system,size,mode,placement", params)
    elif fn == "test_stream":
        if "stream" in prof.kinds:
            for placement in prof.placements:
                for size in prof.sizes:
                    for cls in systems:
                        if "stream" in cls.kinds and (cls.sizes is None or size in cls.sizes):
                            params.append(pytest.param(cls, size, placement,
                                          id=f"{placement}-{size_id(size)}-{cls.name}"))
        metafunc.parametrize("system,size,placement", params)
    elif fn == "test_memcpy":
        sizes = prof.sizes if wanted_memcpy else ()
        metafunc.parametrize("size", [pytest.param(s, id=size_id(s)) for s in sizes])


@pytest.fixture
def profile(request: pytest.FixtureRequest) -> Profile:
    return request.config._bench_profile  # type: ignore[attr-defined]


# ------------------------------------------------------------------ cleanup proof
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = harness.RESOURCES.cleanup()
    if leaked:
        sys.stderr.write("bench: cleaned up after a failure: " + ", ".join(leaked) + "\n")
        if exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    prof: Profile = config._bench_profile  # type: ignore[attr-defined]
    machine_info["fastshm_bench"] = {
        "profile": prof.name,
        "cpu_count": os.cpu_count(),
        "affinity": harness.cpus(),
        "kernel": platform.release(),
        "placements": list(prof.placements),
        "cpu_model": _cpu_model(),
        # other work on the machine shows here; the benchmarks cannot control it
        "loadavg_start": [round(x, 2) for x in getattr(config, "_bench_load_start", ())],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "fastshm": _version("fastshm"),
        "numpy": _version("numpy"),
        "pyzmq": _version("zmq"),
    }


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
