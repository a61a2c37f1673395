"""Finding and reaping fastshm segments: what ``fastshm ls`` and ``fastshm gc`` do.

A segment's creator holds an open-file-description lock on it for as long as
it has it open (:meth:`Segment.owner_alive`).  The kernel drops that lock when
the process dies, however it dies, and the lock is seen from every process
that shares the ``/dev/shm`` (containers included, whatever their PID
namespace): a segment without it belongs to nobody and can be removed.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from fastshm._core import SEGMENT_MAGIC, Segment
from fastshm.pool import HEADER

__all__ = ["SegmentReport", "list_segments", "reap", "SHM_DIR"]

SHM_DIR = "/dev/shm"
PREFIX = "fastshm."


@dataclass
class SegmentReport:
    """What ``fastshm ls`` says of one segment."""

    name: str
    size: int
    uid: int
    mode: int
    age_s: float
    alive: Optional[bool]
    pid: Optional[int] = None
    slots: Optional[int] = None
    slot_size: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def _pool_header(name: str) -> Dict[str, int]:
    try:
        with Segment.open(name) as seg:
            if seg.size < HEADER.size:
                return {}
            fields = HEADER.unpack(seg.read(0, HEADER.size))
    except (OSError, ValueError):
        return {}
    if fields[0] != SEGMENT_MAGIC:
        return {}
    return {"slots": fields[4], "slot_size": fields[6], "pid": fields[9]}


def list_segments(prefix: str = PREFIX) -> List[SegmentReport]:
    """Every segment in ``/dev/shm`` whose name starts with ``prefix``.

    ``alive`` is None when this user may not open the segment to ask.
    """
    reports = []
    now = time.time()
    try:
        names = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
            alive: Optional[bool] = Segment.owner_alive(name)
        except FileNotFoundError:
            continue
        except PermissionError:
            alive = None
        except ValueError:
            continue  # not a name fastshm could have made
        report = SegmentReport(name, st.st_size, st.st_uid, st.st_mode & 0o777,
                               max(0.0, now - st.st_mtime), alive)
        for key, value in _pool_header(name).items():
            setattr(report, key, value)
        reports.append(report)
    return reports


def reap(prefix: str = PREFIX, min_age: float = 2.0, dry_run: bool = False) -> List[str]:
    """Remove segments whose creator is gone; return their names.

    Parameters
    ----------
    prefix : str
        Only names starting with it (``fastshm.`` by default; a publisher
        reaps ``fastshm.<channel>.``).
    min_age : float
        Skip segments modified less than this many seconds ago: one being
        created right now is not locked yet.
    dry_run : bool
        Only say what would be removed.
    """
    removed = []
    for report in list_segments(prefix):
        if report.alive is not False or report.age_s < min_age:
            continue
        if not dry_run:
            try:
                Segment.remove(report.name)
            except FileNotFoundError:
                continue
        removed.append(report.name)
    return removed


