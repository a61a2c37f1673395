"""Shared fixtures: every test is checked for leaked segments, processes and sockets."""

from __future__ import annotations

import gc
import os
import time
from typing import Iterator, Set

import pytest

from fastshm import Segment


def fastshm_segments() -> Set[str]:
    """Names of fastshm segments in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("fastshm.")}


def leaked(names: Set[str]) -> Set[str]:
    """The segments among ``names`` that this test run is responsible for.

    A segment this process still maps, or one whose creator is gone (dead or
    closed without unlinking), is a leak.  A live segment of some other
    process on the machine (another test run, a running service) is not.
    """
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.rsplit("/", 1)[-1].split()[0] for line in f if "/dev/shm/" in line}
    except OSError:
        mapped = set()
    out = set()
    for name in names:
        try:
            if name in mapped or not Segment.owner_alive(name):
                out.add(name)
        except FileNotFoundError:
            pass
    return out


def child_processes() -> Set[int]:
    """PIDs of this process's live (not zombie) children."""
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry))
    return found


def socket_fds() -> Set[str]:
    """Socket inodes this process has open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a segment in /dev/shm, a child process or a socket open."""
    segments, sockets = fastshm_segments(), socket_fds()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while child_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    problems = []
    left = leaked(fastshm_segments() - segments)
    for name in left:
        try:
            Segment.remove(name)
        except FileNotFoundError:
            pass
    if left:
        problems.append(f"segments left in /dev/shm: {sorted(left)}")
    children = child_processes()
    if children:
        problems.append(f"child processes left running: {sorted(children)}")
    open_sockets = socket_fds() - sockets
    if open_sockets:
        problems.append(f"sockets left open: {len(open_sockets)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_segments_left_by_the_run() -> Iterator[None]:
    """Fail the run if any fastshm segment it created is still in /dev/shm at the end."""
    before = fastshm_segments()
    yield
    gc.collect()
    left = leaked(fastshm_segments() - before)
    assert not left, f"the test run left segments in /dev/shm: {sorted(left)}"


@pytest.fixture(params=["tcp", "unix"])
def route(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL to bind a publisher to: an ephemeral TCP port, or a fresh Unix socket path."""
    if request.param == "tcp":
        return "tcp://127.0.0.1:0"
    return f"unix://{tmp_path_factory.mktemp('route')}/pub.sock"
