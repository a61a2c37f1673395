"""The benchmarked systems, in report order; see ``base.py`` for the plug-in interface."""

from __future__ import annotations

from bench.systems.base import System
from bench.systems.fastshm_ import FastShmLoanTcp, FastShmLoanUnix, FastShmTcp, FastShmUnix
from bench.systems.mpqueue import MpQueue
from bench.systems.shm import ShmDescriptor
from bench.systems.sockets import BareTcp, BareUnix, TcpSocket, UnixSocket
from bench.systems.zeromq import ZmqIpc, ZmqTcp

SYSTEMS: list[type[System]] = [
    FastShmTcp,
    FastShmUnix,
    FastShmLoanTcp,
    FastShmLoanUnix,
    TcpSocket,
    UnixSocket,
    ShmDescriptor,
    MpQueue,
    ZmqTcp,
    ZmqIpc,
    BareTcp,
    BareUnix,
]


def by_name(name: str) -> type[System]:
    for cls in SYSTEMS:
        if cls.name == name:
            return cls
    raise KeyError(name)


__all__ = ["SYSTEMS", "System", "by_name"]
