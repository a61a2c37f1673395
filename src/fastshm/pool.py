"""A pool of fixed-size slots in one shared-memory segment.

The segment starts with a header (``docs/PROTOCOL.md``, "Segment layout"):
magic, layout version, geometry and the owner's identity, then a slot table
holding each slot's generation.  A slot's generation is bumped every time the
slot is taken for a new payload, so an address that names an older generation
is recognised as stale by any reader.

Free slots are handed out most-recently-freed first: a slot that was just
released is still in the CPU cache, and reusing it is markedly faster for
large payloads than cycling through the whole pool.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Optional

from fastshm import _core
from fastshm._core import Segment, segment_layout

__all__ = ["SlotPool", "segment_size", "HEADER"]

#: The fixed segment header (the slot table follows at ``SEGMENT_HEADER_SIZE``).
HEADER = struct.Struct("<8sIIQIIQQQIIQ16s40x")
assert HEADER.size == _core.SEGMENT_HEADER_SIZE


def segment_size(slot_size: int, slots: int) -> int:
    """Bytes of shared memory a pool of ``slots`` slots of ``slot_size`` bytes takes.

    This is what ``/dev/shm`` (Docker ``--shm-size``, IoT Edge ``ShmSize``)
    must have free for one publisher, on a system with ``mmap.PAGESIZE`` pages.
    """
    return segment_layout(slot_size, slots, mmap.PAGESIZE)[2]


def _process_start_ticks() -> int:
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))
    except (OSError, ValueError):
        return bytes(16)


class SlotPool:
    """Slots of ``slot_size`` bytes in a segment this process creates and owns.

    Parameters
    ----------
    slot_size : int
        The largest payload a slot holds.
    slots : int
        How many slots.
    name, mode, group
        Passed to :meth:`Segment.create`.

    Notes
    -----
    A slot is *free*, *taken* (being filled), or *held* by the subscribers it
    was sent to.  Each holder releases it once; the last release frees it.
    """

    def __init__(self, slot_size: int, slots: int, *, name: Optional[str] = None,
                 mode: int = 0o600, group: Optional[int] = None) -> None:
        self.slot_size = int(slot_size)
        self.slots = int(slots)
        self.data_offset, self.slot_stride, size = segment_layout(
            self.slot_size, self.slots, mmap.PAGESIZE)
        self.segment = Segment.create(size, name, mode, group=group)
        self.segment.write(0, HEADER.pack(
            _core.SEGMENT_MAGIC, _core.SEGMENT_LAYOUT_VERSION, _core.SEGMENT_HEADER_SIZE,
            size, self.slots, _core.SLOT_ENTRY_SIZE, self.slot_size, self.slot_stride,
            self.data_offset, os.getpid(), 0, _process_start_ticks(), _boot_id()))
        self._generation = [0] * self.slots
        self._holders = [0] * self.slots
        # A stack: pop() hands out the slot freed last.
        self._free = list(range(self.slots - 1, -1, -1))

    @property
    def free_count(self) -> int:
        """Slots free right now."""
        return len(self._free)

    def offset(self, slot: int) -> int:
        """Byte offset of ``slot`` in the segment."""
        return self.data_offset + slot * self.slot_stride

    def generation(self, slot: int) -> int:
        """The generation of the payload now in ``slot``."""
        return self._generation[slot]

    def holders(self, slot: int) -> int:
        """How many subscribers still hold ``slot``."""
        return self._holders[slot]

    def acquire(self) -> Optional[int]:
        """Take a free slot for a new payload and bump its generation; None if none is free."""
        if not self._free:
            return None
        slot = self._free.pop()
        gen = self._generation[slot] + 1
        self._generation[slot] = gen
        self.segment.store_u64(_core.SEGMENT_HEADER_SIZE + slot * _core.SLOT_ENTRY_SIZE, gen)
        return slot

    def commit(self, slot: int, holders: int) -> None:
        """Record that ``holders`` subscribers received ``slot``; 0 frees it at once."""
        if holders <= 0:
            self._free.append(slot)
        else:
            self._holders[slot] = holders

    def discard(self, slot: int) -> None:
        """Give back a slot that was taken but not published."""
        self._free.append(slot)

    def release(self, slot: int, generation: int) -> bool:
        """One holder gives ``slot`` back; True if that was valid.

        A release for a slot that is not held, or for another generation, is
        refused (returns False) and changes nothing.
        """
        if not 0 <= slot < self.slots or self._generation[slot] != generation:
            return False
        held = self._holders[slot]
        if held <= 0:
            return False
        held -= 1
        self._holders[slot] = held
        if held == 0:
            self._free.append(slot)
        return True

    def close(self) -> None:
        """Unlink the segment and unmap it; readers' mappings stay valid.

        Views of the segment still alive in this process (arrays from
        ``loan_array``) keep it mapped until they are gone.
        """
        try:
            self.segment.unlink()
        finally:
            try:
                self.segment.close()
            except BufferError:
                pass
