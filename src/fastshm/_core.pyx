# cython: language_level=3, embedsignature=True, binding=False
# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""fastshm's compiled core: segments, the address codec, framed socket I/O.

Everything here is mechanical: map, copy, pack, unpack, send, receive. Names,
defaults, retries, timeouts and every decision about peers live in the Python
modules above it.  Every length, offset and id that comes from outside (the
wire, a caller, a segment's size) is checked here before it is used; bounds and
wraparound checks are off because the code checks its own bounds.

The wire format and the segment layout are specified in ``docs/PROTOCOL.md``.
"""

from cpython.buffer cimport (
    PyBUF_ANY_CONTIGUOUS, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_FillInfo,
    PyBuffer_Release, PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint16_t, uint32_t, uint64_t, UINT64_MAX
from libc.math cimport ceil

cimport cython

from fastshm.includes.posix cimport *

import os as _os
from operator import index as _index
import re as _re
import time as _time

from fastshm.errors import Disconnected, GenerationError, ProtocolError

# --- constants (docs/PROTOCOL.md is normative) --------------------------------

#: First two bytes of every frame: b"FS".
FRAME_MAGIC = 0x5346
#: Version of the frame format this core speaks.
WIRE_VERSION = 1
#: Size of a frame header: magic u16, version u8, type u8, body length u32.
FRAME_HEADER_SIZE = 8
#: Largest control-frame body accepted unless the connection raises the cap.
DEFAULT_MAX_BODY = 65536

# Frame types.
HELLO = 1
AUTH = 2
SEGMENT = 3
ADDRESS = 4
INLINE = 5
RELEASE = 6
CREDIT = 7
PING = 8
PONG = 9
BYE = 10
ERROR = 11
PROBE = 12

#: Fixed part of a packed address; the name and metadata follow it.
ADDRESS_FIXED_SIZE = 56
#: Longest segment name an address may carry, in bytes.
ADDRESS_MAX_NAME = 255
#: Largest metadata an address may carry, in bytes.
ADDRESS_MAX_META = 1024
#: Address flag bits defined by protocol v1.
FLAG_INLINE = 0x1
FLAG_NDARRAY = 0x2
ADDRESS_KNOWN_FLAGS = FLAG_INLINE | FLAG_NDARRAY

#: Size of one entry of a RELEASE frame (segment id u32, slot u32, generation u64).
RELEASE_ENTRY_SIZE = 16
#: Releases packed into one RELEASE frame at the most.
RELEASE_MAX_ENTRIES = 4096

#: Segment header: magic, then geometry and owner identity; the slot table follows.
SEGMENT_MAGIC = b"FASTSHM\x00"
SEGMENT_LAYOUT_VERSION = 1
SEGMENT_HEADER_SIZE = 128
SLOT_ENTRY_SIZE = 64
#: Longest segment name, without the leading slash.
SEGMENT_MAX_NAME = 200

# C-level twins of the constants above.
cdef enum:
    NOGIL_COPY = 65536      # copies at least this large release the GIL
    HDR = 8
    ADDR_FIXED = 56
    MAX_NAME = 255
    MAX_META = 1024
    KNOWN_FLAGS = 3
    T_ADDRESS = 4
    T_INLINE = 5
    T_RELEASE = 6
    FLAG_INL = 1
    MAX_IOV = 64
    MAX_RELEASES = 4096
    HEADER_SIZE = 128
    ENTRY_SIZE = 64

_NAME_RE = _re.compile(r"[A-Za-z0-9._-]{1,200}\Z")


# --- helpers ------------------------------------------------------------------

cdef inline bint _name_byte_ok(char c) noexcept nogil:
    return ((c >= b'a' and c <= b'z') or (c >= b'A' and c <= b'Z')
            or (c >= b'0' and c <= b'9') or c == b'.' or c == b'_' or c == b'-')


def check_name(name):
    """Validate a segment name and return it without its leading slash.

    Parameters
    ----------
    name : str
        ``"fastshm.cam.1a2b"`` or ``"/fastshm.cam.1a2b"``: letters, digits,
        ``.``, ``_`` and ``-``, 1 to 200 of them, not ``.`` or ``..``.

    Raises
    ------
    ValueError
        If the name is not of that form.
    """
    if not isinstance(name, str):
        raise TypeError(f"segment name must be str, not {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not _NAME_RE.match(bare) or bare in (".", ".."):
        raise ValueError(
            f"invalid segment name {name!r}: use 1 to {SEGMENT_MAX_NAME} letters, digits, "
            f"'.', '_' or '-' (an optional leading '/' is allowed)")
    return bare


cdef double _deadline(object timeout) except? -2.0:
    """Absolute monotonic deadline for a timeout; -1 means none."""
    if timeout is None:
        return -1.0
    t = float(timeout)
    if t < 0:
        raise ValueError("timeout must be None or >= 0")
    return _time.monotonic() + t


cdef int _remaining_ms(double deadline) except? -2:
    """Milliseconds left until ``deadline`` for poll(); -1 waits forever."""
    if deadline < 0:
        return -1
    left = deadline - _time.monotonic()
    if left <= 0:
        return 0
    return <int>min(ceil(left * 1000.0), 2147483647.0)


cdef int _wait_fd(int fd, short events, double deadline) except -1:
    """Wait until ``fd`` is ready for ``events``; 1 if ready, 0 on timeout."""
    cdef pollfd p
    cdef int rc, err, ms
    while True:
        ms = _remaining_ms(deadline)
        p.fd = fd
        p.events = events
        p.revents = 0
        with nogil:
            rc = poll(&p, 1, ms)
            err = errno
        if rc > 0:
            return 1
        if rc == 0:
            if _remaining_ms(deadline) == 0:
                return 0
            continue
        if err == EINTR:
            PyErr_CheckSignals()
            continue
        _raise_errno(err, None)


cdef int _raise_errno(int err, object name) except -1:
    """Raise the builtin OSError subclass for ``err``, naming ``name``."""
    if name is None:
        raise OSError(err, _os.strerror(err))
    raise OSError(err, _os.strerror(err), name)


cdef int _copy(char *dst, const char *src, Py_ssize_t n) except -1:
    if n >= NOGIL_COPY:
        with nogil:
            memcpy(dst, src, <size_t>n)
    elif n > 0:
        memcpy(dst, src, <size_t>n)
    return 0


cdef inline uint64_t _u64(object value, str field) except? 0xFFFFFFFFFFFFFFFF:
    value = _index(value)
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{field} must be in 0..2**64-1, got {value!r}")
    return <uint64_t>value


cdef inline uint32_t _u32(object value, str field) except? 0xFFFFFFFF:
    value = _index(value)
    if value < 0 or value > 0xFFFFFFFF:
        raise ValueError(f"{field} must be in 0..2**32-1, got {value!r}")
    return <uint32_t>value


# --- Segment --------------------------------------------------------------------

def _free_space(path=b"/dev/shm"):
    cdef statvfs st
    if c_statvfs(path, &st) != 0:
        return None
    return st.f_bavail * st.f_frsize


cdef class Segment:
    """A POSIX shared-memory segment, mapped into this process.

    Make one with :meth:`create` (this process owns it and unlinks it) or
    attach to an existing one with :meth:`open`.  A segment exports the buffer
    protocol: ``memoryview(segment)`` is a zero-copy view, writable only when
    the segment was mapped read-write.  Views are counted, and :meth:`close`
    refuses to unmap while any is alive (``BufferError``), as ``mmap.close``
    does.
    """

    def __cinit__(self):
        self._addr = NULL
        self._fd = -1
        self._size = 0
        self._exports = 0

    def __init__(self):
        raise TypeError("use Segment.create(...) or Segment.open(...)")

    @staticmethod
    def create(size, name=None, mode=0o600, *, group=None):
        """Create, size, reserve and map a new segment read-write.

        Parameters
        ----------
        size : int
            Bytes to reserve; they are allocated now (``posix_fallocate``), so a
            ``/dev/shm`` too small fails here and never as a SIGBUS later.
        name : str, optional
            The segment's name; an unguessable ``fastshm.<random>`` by default.
        mode : int
            Permission bits, ``0o600`` by default (owner only).
        group : int, optional
            A group id to give the segment, for readers running as another user
            of that group (with ``mode=0o640``).

        Returns
        -------
        Segment
            Owned by this process: :meth:`unlink` (and leaving a ``with``
            block) removes it.

        Raises
        ------
        FileExistsError
            If a segment of that name exists.
        OSError
            ``ENOSPC`` with the size asked and the space free when ``/dev/shm``
            is too small.
        """
        cdef Segment self = Segment.__new__(Segment)
        cdef Py_ssize_t n = size
        cdef int fd, err, rc
        cdef mode_t cmode = mode
        cdef const char *cpath
        cdef void *addr
        if n <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        if name is None:
            name = "fastshm." + _os.urandom(12).hex()
        self._name = check_name(name)
        self._path = ("/" + self._name).encode("ascii")
        cpath = self._path
        while True:
            with nogil:
                fd = shm_open(cpath, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, cmode)
                err = errno
            if fd >= 0:
                break
            if err != EINTR:
                _raise_errno(err, "/" + self._name)
            PyErr_CheckSignals()
        try:
            # Locked at once: `fastshm gc` must never take a segment being made for dead.
            _lock_owner(fd)
            # shm_open applies the umask; the caller's mode is what they asked for.
            if fchmod(fd, cmode) != 0:
                _raise_errno(errno, "/" + self._name)
            if group is not None and fchown(fd, <uid_t>-1, <gid_t>group) != 0:
                _raise_errno(errno, "/" + self._name)
            while True:
                with nogil:
                    rc = ftruncate(fd, <off_t>n)
                    err = errno
                if rc == 0:
                    break
                if err != EINTR:
                    _raise_errno(err, "/" + self._name)
                PyErr_CheckSignals()
            while True:
                with nogil:
                    rc = posix_fallocate(fd, 0, <off_t>n)
                if rc == 0:
                    break
                if rc == ENOSPC:
                    free = _free_space()
                    raise OSError(
                        ENOSPC,
                        f"cannot reserve {n} bytes for shared memory: /dev/shm has "
                        f"{'an unknown number of' if free is None else free} bytes free; "
                        f"make /dev/shm larger (Docker: --shm-size, IoT Edge createOptions: "
                        f"HostConfig.ShmSize) or use fewer or smaller slots",
                        "/" + self._name)
                if rc != EINTR:
                    _raise_errno(rc, "/" + self._name)
                PyErr_CheckSignals()
            with nogil:
                addr = mmap(NULL, <size_t>n, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_POPULATE, fd, 0)
                err = errno
            if addr == MAP_FAILED:
                _raise_errno(err, "/" + self._name)
        except BaseException:
            close(fd)
            shm_unlink(cpath)
            raise
        self._addr = <char *>addr
        self._size = n
        self._fd = fd
        self._readonly = False
        self._owner = True
        self._creator_pid = getpid()
        return self

    @staticmethod
    def open(name, readonly=True):
        """Map an existing segment; its size comes from ``fstat``.

        Parameters
        ----------
        name : str
            The segment's name, with or without the leading slash.
        readonly : bool
            Map with ``PROT_READ`` only (the default): writes through any view
            fail, so a reader can never corrupt a writer.

        Raises
        ------
        FileNotFoundError
            If no segment has that name.
        PermissionError
            If this user may not open it, saying what to change.
        """
        cdef Segment self = Segment.__new__(Segment)
        cdef int fd, err, rc
        cdef int flags = O_RDONLY if readonly else O_RDWR
        cdef int prot = PROT_READ if readonly else PROT_READ | PROT_WRITE
        cdef const char *cpath
        cdef stat st
        cdef void *addr
        self._name = check_name(name)
        self._path = ("/" + self._name).encode("ascii")
        cpath = self._path
        while True:
            with nogil:
                fd = shm_open(cpath, flags | O_CLOEXEC, 0)
                err = errno
            if fd >= 0:
                break
            if err == EACCES:
                raise PermissionError(EACCES, _permission_hint(self._name, readonly),
                                      "/" + self._name)
            if err != EINTR:
                _raise_errno(err, "/" + self._name)
            PyErr_CheckSignals()
        try:
            if fstat(fd, &st) != 0:
                _raise_errno(errno, "/" + self._name)
            if st.st_size <= 0:
                raise OSError(EINVAL, "shared memory segment is empty", "/" + self._name)
            with nogil:
                addr = mmap(NULL, <size_t>st.st_size, prot, MAP_SHARED | MAP_POPULATE, fd, 0)
                err = errno
            if addr == MAP_FAILED:
                _raise_errno(err, "/" + self._name)
        finally:
            close(fd)
        self._addr = <char *>addr
        self._size = st.st_size
        self._readonly = readonly
        self._owner = False
        return self

    @staticmethod
    def remove(name):
        """Unlink the segment called ``name`` whoever created it (``fastshm gc``).

        Mappings that exist stay valid; the name disappears at once.
        """
        cdef bytes path = ("/" + check_name(name)).encode("ascii")
        if shm_unlink(path) != 0:
            _raise_errno(errno, path.decode())

    @staticmethod
    def owner_alive(name):
        """Whether the process that created ``name`` still holds it open.

        The creator holds an open-file-description lock on its segment for as
        long as it is open; the lock dies with the process (even SIGKILL), and
        it is seen across PID namespaces, so containers that share
        ``/dev/shm`` agree on it.

        Raises
        ------
        FileNotFoundError
            If no segment has that name.
        """
        cdef bytes path = ("/" + check_name(name)).encode("ascii")
        cdef int fd = shm_open(path, O_RDONLY | O_CLOEXEC, 0)
        cdef flock lk
        cdef int rc, err
        if fd < 0:
            _raise_errno(errno, path.decode())
        lk.l_type = F_RDLCK
        lk.l_whence = SEEK_SET
        lk.l_start = 0
        lk.l_len = 1
        lk.l_pid = 0
        rc = fcntl(fd, F_OFD_GETLK, &lk)
        err = errno
        close(fd)
        if rc != 0:
            _raise_errno(err, path.decode())
        return lk.l_type != F_UNLCK

    cdef int _check_open(self) except -1:
        if self._addr == NULL:
            raise ValueError(f"segment '/{self._name}' is closed")
        return 0

    cdef int _check_span(self, Py_ssize_t offset, Py_ssize_t length) except -1:
        self._check_open()
        if offset < 0 or length < 0 or offset > self._size or length > self._size - offset:
            raise IndexError(
                f"span [{offset}, {offset}+{length}) is outside segment '/{self._name}' "
                f"of {self._size} bytes")
        return 0

    @property
    def name(self):
        """The segment's name, without the leading slash."""
        return self._name

    @property
    def size(self):
        """The mapped size in bytes, exactly as created (or as ``fstat`` says)."""
        return self._size

    @property
    def readonly(self):
        """True when mapped with ``PROT_READ`` only."""
        return self._readonly

    @property
    def closed(self):
        """True once :meth:`close` has unmapped the segment."""
        return self._addr == NULL

    @property
    def owner(self):
        """True in the object that created the segment (and so unlinks it)."""
        return self._owner

    @property
    def exports(self):
        """How many buffer views (and messages) of this mapping are alive."""
        return self._exports

    def write(self, Py_ssize_t offset, data, Py_ssize_t limit=-1):
        """Copy ``data`` (any contiguous buffer) into the segment at ``offset``.

        Large copies release the GIL.  ``limit``, when given, is the most
        bytes the caller allows (a slot's size).

        Returns
        -------
        int
            The number of bytes written.

        Raises
        ------
        IndexError
            If the data would not fit inside the segment.
        ValueError
            If it is longer than ``limit``.
        """
        cdef Py_buffer view
        if self._readonly:
            raise PermissionError(f"segment '/{self._name}' is mapped read-only")
        self._check_open()
        PyObject_GetBuffer(data, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            if limit >= 0 and view.len > limit:
                raise ValueError(f"payload of {view.len} bytes does not fit in {limit} bytes")
            self._check_span(offset, view.len)
            self._exports += 1  # close() from another thread must wait for the copy
            try:
                _copy(self._addr + offset, <const char *>view.buf, view.len)
            finally:
                self._exports -= 1
            return view.len
        finally:
            PyBuffer_Release(&view)

    def read(self, Py_ssize_t offset, Py_ssize_t n):
        """Return a copy of ``n`` bytes at ``offset`` as ``bytes``."""
        self._check_span(offset, n)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        self._exports += 1
        try:
            _copy(PyBytes_AS_STRING(out), self._addr + offset, n)
        finally:
            self._exports -= 1
        return out

    def read_into(self, Py_ssize_t offset, buffer):
        """Copy bytes at ``offset`` into the writable ``buffer``; return how many.

        As many bytes as ``buffer`` holds are copied; the span must lie inside
        the segment.
        """
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS | PyBUF_WRITABLE)
        try:
            self._check_span(offset, view.len)
            self._exports += 1
            try:
                _copy(<char *>view.buf, self._addr + offset, view.len)
            finally:
                self._exports -= 1
            return view.len
        finally:
            PyBuffer_Release(&view)

    def load_u64(self, Py_ssize_t offset):
        """Atomically load the little-endian u64 at ``offset`` (acquire order)."""
        self._check_span(offset, 8)
        if offset % 8:
            raise ValueError("u64 offset must be 8-byte aligned")
        return fastshm_load_acquire_u64(self._addr + offset)

    def store_u64(self, Py_ssize_t offset, value):
        """Atomically store ``value`` as a little-endian u64 at ``offset`` (release order)."""
        cdef uint64_t v = _u64(value, "value")
        if self._readonly:
            raise PermissionError(f"segment '/{self._name}' is mapped read-only")
        self._check_span(offset, 8)
        if offset % 8:
            raise ValueError("u64 offset must be 8-byte aligned")
        fastshm_store_release_u64(self._addr + offset, v)

    def close(self):
        """Unmap the segment (and, in its creator, drop the ownership lock).

        Does not unlink it: see :meth:`unlink`.  Closing twice is harmless.

        Raises
        ------
        BufferError
            If views of the segment (or messages in it) are still alive.
        """
        if self._exports > 0:
            raise BufferError(
                f"cannot close segment '/{self._name}': {self._exports} view(s) of it "
                f"are still alive")
        self._unmap()

    def _unmap(self):
        if self._addr != NULL:
            munmap(self._addr, <size_t>self._size)
            self._addr = NULL
        if self._fd >= 0:
            close(self._fd)
            self._fd = -1

    def unlink(self):
        """Remove the segment's name (creator only); mappings stay valid.

        Raises
        ------
        PermissionError
            If this object attached to the segment instead of creating it:
            ownership follows :meth:`create` (use :meth:`remove` to force).
        """
        if not self._owner:
            raise PermissionError(
                f"segment '/{self._name}' was opened, not created, here: only its creator "
                f"unlinks it (Segment.remove(name) forces it)")
        if self._unlinked:
            return
        self._unlinked = True
        if shm_unlink(self._path) != 0 and errno != ENOENT:
            _raise_errno(errno, "/" + self._name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        if self._owner:
            self.unlink()
        return False

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_open()
        PyBuffer_FillInfo(buffer, self, self._addr, self._size, self._readonly, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    def __len__(self):
        return self._size

    def __repr__(self):
        state = "closed" if self._addr == NULL else ("ro" if self._readonly else "rw")
        return f"<fastshm.Segment '/{self._name}' size={self._size} {state}>"

    def __dealloc__(self):
        if self._addr != NULL:
            munmap(self._addr, <size_t>self._size)
            self._addr = NULL
        if self._fd >= 0:
            close(self._fd)
            self._fd = -1
        if self._owner and not self._unlinked and self._creator_pid == getpid():
            shm_unlink(self._path)


cdef int _lock_owner(int fd) except -1:
    cdef flock lk
    lk.l_type = F_WRLCK
    lk.l_whence = SEEK_SET
    lk.l_start = 0
    lk.l_len = 1
    lk.l_pid = 0
    if fcntl(fd, F_OFD_SETLK, &lk) != 0:
        _raise_errno(errno, None)
    return 0


def _permission_hint(str name, bint readonly):
    try:
        st = _os.stat("/dev/shm/" + name)
        who = f"it belongs to uid {st.st_uid}, gid {st.st_gid}, mode {st.st_mode & 0o777:#o}"
    except OSError:
        who = "its owner or mode does not allow this user"
    need = "read" if readonly else "read and write"
    return (f"Permission denied: this process (uid {_os.geteuid()}, gid {_os.getegid()}) "
            f"may not {need} shared memory segment '/{name}': {who}. Run both sides as "
            f"the same user, or create the segment with mode=0o640 (0o660 to write) and "
            f"a group this user belongs to (group=...)")


# --- Address --------------------------------------------------------------------

cdef int _fill_address(Address a, uint32_t segment_id, uint32_t slot, uint64_t offset,
                       uint64_t length, uint64_t generation, uint64_t sequence,
                       uint64_t timestamp_ns, uint32_t flags, str name,
                       bytes meta) except -1:
    """Check and store an address's fields (``name`` already validated)."""
    if length > UINT64_MAX - offset:
        raise ValueError("offset + length overflows 64 bits")
    if flags & ~(<uint32_t>KNOWN_FLAGS):
        raise ValueError(f"unknown address flags {flags:#x}")
    if len(meta) > MAX_META:
        raise ValueError(f"address metadata is limited to {MAX_META} bytes, got {len(meta)}")
    a.segment_id = segment_id
    a.slot = slot
    a.offset = offset
    a.length = length
    a.generation = generation
    a.sequence = sequence
    a.timestamp_ns = timestamp_ns
    a.flags = flags
    a.name = name
    a._name_bytes = name.encode("ascii")
    a.meta = meta
    return 0


cdef class Address:
    """Where a payload is: segment, offset, length, generation and sequence.

    Immutable.  It packs to a fixed little-endian layout of 56 bytes, followed
    by an optional segment name (for addresses sent outside a fastshm route)
    and optional small metadata (dtype and shape, for instance).

    Parameters
    ----------
    segment_id : int
        The segment's id on a route (announced by a SEGMENT frame); 0 when
        ``name`` says which segment.
    offset, length : int
        The payload's span in the segment.
    generation : int
        The slot's generation when the payload was written; a reader that sees
        another generation in the segment header refuses the address.
    sequence : int
        The message's sequence number.
    slot : int
        The slot index in the publisher's pool.
    timestamp_ns : int
        ``time.time_ns()`` when the payload was published.
    flags : int
        ``FLAG_INLINE``, ``FLAG_NDARRAY``.
    name : str
        The segment name, for use without a route ('' otherwise).
    meta : bytes
        Up to 1024 bytes of application metadata.
    """

    def __init__(self, segment_id, offset, length, generation=0, sequence=0, *,
                 slot=0, timestamp_ns=0, flags=0, name="", meta=b""):
        name = check_name(name) if name else ""
        _fill_address(self, _u32(segment_id, "segment_id"), _u32(slot, "slot"),
                      _u64(offset, "offset"), _u64(length, "length"),
                      _u64(generation, "generation"), _u64(sequence, "sequence"),
                      _u64(timestamp_ns, "timestamp_ns"), _u32(flags, "flags"),
                      name, bytes(meta))

    @staticmethod
    def _for_slot(uint32_t segment_id, uint32_t slot, uint64_t offset, uint64_t length,
                  uint64_t generation, uint64_t sequence, uint64_t timestamp_ns,
                  uint32_t flags, bytes meta):
        """A publisher's address for a slot: positional and checked in C (the hot path)."""
        cdef Address a = Address.__new__(Address)
        _fill_address(a, segment_id, slot, offset, length, generation, sequence,
                      timestamp_ns, flags, "", meta)
        return a

    cdef Py_ssize_t _packed_size(self):
        return ADDR_FIXED + len(self._name_bytes) + len(self.meta)

    cdef void _pack_into(self, char *p):
        cdef Py_ssize_t nlen = len(self._name_bytes)
        cdef Py_ssize_t mlen = len(self.meta)
        fastshm_put_u32(p, self.segment_id)
        fastshm_put_u32(p + 4, self.slot)
        fastshm_put_u64(p + 8, self.offset)
        fastshm_put_u64(p + 16, self.length)
        fastshm_put_u64(p + 24, self.generation)
        fastshm_put_u64(p + 32, self.sequence)
        fastshm_put_u64(p + 40, self.timestamp_ns)
        fastshm_put_u32(p + 48, self.flags)
        p[52] = <char>nlen
        p[53] = 0
        fastshm_put_u16(p + 54, <uint16_t>mlen)
        if nlen:
            memcpy(p + ADDR_FIXED, PyBytes_AS_STRING(self._name_bytes), nlen)
        if mlen:
            memcpy(p + ADDR_FIXED + nlen, PyBytes_AS_STRING(self.meta), mlen)

    def pack(self):
        """Return the address in its wire layout (``docs/PROTOCOL.md``)."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self._packed_size())
        self._pack_into(PyBytes_AS_STRING(out))
        return out

    @staticmethod
    def unpack(buffer):
        """Parse a packed address from ``buffer``, which must hold exactly one.

        Raises
        ------
        ProtocolError
            If the bytes are not a valid address: too short or too long, a
            reserved byte set, an unknown flag, a bad name, oversized metadata,
            or an offset + length that overflows 64 bits.
        """
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            return _address_from(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def view(self, Segment segment):
        """A zero-copy ``memoryview`` of the payload in ``segment``, bounds-checked."""
        segment._check_open()
        if self.offset > <uint64_t>segment._size or self.length > <uint64_t>segment._size - self.offset:
            raise IndexError(
                f"address [{self.offset}, +{self.length}) is outside segment "
                f"'/{segment._name}' of {segment._size} bytes")
        return memoryview(segment)[self.offset:self.offset + self.length]

    def _astuple(self):
        return (self.segment_id, self.offset, self.length, self.generation, self.sequence,
                self.slot, self.timestamp_ns, self.flags, self.name, self.meta)

    def __eq__(self, other):
        if not isinstance(other, Address):
            return NotImplemented
        return self._astuple() == (<Address>other)._astuple()

    def __ne__(self, other):
        if not isinstance(other, Address):
            return NotImplemented
        return self._astuple() != (<Address>other)._astuple()

    def __hash__(self):
        return hash(self._astuple())

    def __reduce__(self):
        return (_address_from_bytes, (self.pack(),))

    def __repr__(self):
        extra = f", name={self.name!r}" if self.name else ""
        if self.meta:
            extra += f", meta={self.meta!r}"
        return (f"Address(segment_id={self.segment_id}, offset={self.offset}, "
                f"length={self.length}, generation={self.generation}, "
                f"sequence={self.sequence}, slot={self.slot}, "
                f"timestamp_ns={self.timestamp_ns}, flags={self.flags:#x}{extra})")


def _address_from_bytes(data):
    return Address.unpack(data)


cdef Address _address_from(const char *p, Py_ssize_t n):
    cdef Py_ssize_t nlen, mlen, i
    cdef Address a
    if n < ADDR_FIXED:
        raise ProtocolError(f"address is {n} bytes, shorter than its fixed {ADDR_FIXED}")
    nlen = <unsigned char>p[52]
    mlen = fastshm_get_u16(p + 54)
    if p[53] != 0:
        raise ProtocolError("address reserved byte is not zero")
    if mlen > MAX_META:
        raise ProtocolError(f"address metadata of {mlen} bytes exceeds {MAX_META}")
    if n != ADDR_FIXED + nlen + mlen:
        raise ProtocolError(
            f"address is {n} bytes but its header says {ADDR_FIXED + nlen + mlen}")
    a = Address.__new__(Address)
    a.segment_id = fastshm_get_u32(p)
    a.slot = fastshm_get_u32(p + 4)
    a.offset = fastshm_get_u64(p + 8)
    a.length = fastshm_get_u64(p + 16)
    if a.length > UINT64_MAX - a.offset:
        raise ProtocolError("address offset + length overflows 64 bits")
    a.generation = fastshm_get_u64(p + 24)
    a.sequence = fastshm_get_u64(p + 32)
    a.timestamp_ns = fastshm_get_u64(p + 40)
    a.flags = fastshm_get_u32(p + 48)
    if a.flags & ~(<uint32_t>KNOWN_FLAGS):
        raise ProtocolError(f"address has unknown flags {a.flags:#x}")
    if nlen:
        for i in range(nlen):
            if not _name_byte_ok(p[ADDR_FIXED + i]):
                raise ProtocolError("address segment name has a forbidden character")
        a._name_bytes = PyBytes_FromStringAndSize(p + ADDR_FIXED, nlen)
        a.name = a._name_bytes.decode("ascii")
        if nlen > 200 or a.name in (".", ".."):
            raise ProtocolError(f"address segment name {a.name!r} is not valid")
    else:
        a._name_bytes = b""
        a.name = ""
    a.meta = PyBytes_FromStringAndSize(p + ADDR_FIXED + nlen, mlen) if mlen else b""
    return a


# --- Stream: framed socket I/O --------------------------------------------------

cdef class Stream:
    """Frames over one connected, non-blocking stream socket.

    Output is queued into one buffer and sent by :meth:`flush` in as few
    ``sendmsg`` calls as the kernel allows, so many small frames (addresses,
    releases) cost one syscall.  The payload of an INLINE frame is not copied:
    :meth:`queue_inline` holds an export of the caller's buffer (a slot) and
    ``sendmsg`` gathers it straight from there, between the queued frames.  Input is read in large chunks by :meth:`fill`
    and split into whole frames by :meth:`next_frame`.  Syscalls run without
    the GIL; ``EINTR`` is retried after signal handlers ran; ``EAGAIN`` waits
    in ``poll`` up to the timeout given.

    The socket object is kept alive by the stream but is closed by its owner.
    """

    def __cinit__(self):
        self._rbuf = NULL
        self._wbuf = NULL
        self._chunks = NULL
        self._release_at = -1

    def __init__(self, sock, Py_ssize_t max_body=DEFAULT_MAX_BODY):
        self._sock = sock
        self._fd = sock.fileno()
        if self._fd < 0:
            raise ValueError("socket is closed")
        self.max_body = max_body
        self._rcap = 65536
        self._rbuf = <char *>PyMem_Malloc(self._rcap)
        self._wcap = 16384
        self._wbuf = <char *>PyMem_Malloc(self._wcap)
        if self._rbuf == NULL or self._wbuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        self._release_chunks()
        PyMem_Free(self._chunks)
        PyMem_Free(self._rbuf)
        PyMem_Free(self._wbuf)
        PyMem_Free(self._side)

    cdef void _release_chunks(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self._nchunks):
            PyBuffer_Release(&self._chunks[i].view)
        self._nchunks = 0
        self._chunk_off = 0
        self._chunk_bytes = 0

    def fileno(self):
        """The socket's file descriptor."""
        return self._fd

    @property
    def pending(self):
        """Bytes queued and not yet sent (INLINE payloads included)."""
        self._merge_side()
        return self._wlen + self._chunk_bytes

    @property
    def pending_payload(self):
        """Bytes of INLINE payloads queued and not yet sent."""
        return self._chunk_bytes

    @property
    def pending_buffers(self):
        """INLINE payloads queued whose buffers the stream still holds."""
        return self._nchunks

    @property
    def buffered(self):
        """Bytes received and not yet parsed into frames."""
        return self._rend - self._rstart

    def close(self):
        """Stop using the socket: queued frames are dropped, held buffers let go."""
        self._closed = True
        self._side_len = 0
        self._wlen = 0
        self._release_at = -1
        self._release_chunks()
        self._in_address = None
        self._in_payload = None

    cdef int _reserve(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = self._wcap
        cdef char *buf
        if self._wlen + n <= cap:
            return 0
        while cap < self._wlen + n:
            cap *= 2
        buf = <char *>PyMem_Realloc(self._wbuf, cap)
        if buf == NULL:
            raise MemoryError()
        self._wbuf = buf
        self._wcap = cap
        return 0

    cdef inline void _put_header(self, int ftype, Py_ssize_t n) noexcept:
        cdef char *p = self._wbuf + self._wlen
        fastshm_put_u16(p, 0x5346)
        p[2] = 1
        p[3] = <char>ftype
        fastshm_put_u32(p + 4, <uint32_t>n)
        self._wlen += HDR

    def queue(self, int ftype, body=b""):
        """Queue one frame of type ``ftype`` with ``body`` (a bytes-like object)."""
        cdef Py_buffer view
        if ftype < 1 or ftype > 255:
            raise ValueError("frame type must be in 1..255")
        if self._closed:
            return
        PyObject_GetBuffer(body, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            if view.len > 0xFFFFFFFF:
                raise ValueError("frame body too large")
            self._reserve(HDR + view.len)
            self._release_at = -1
            self._put_header(ftype, view.len)
            memcpy(self._wbuf + self._wlen, view.buf, view.len)
            self._wlen += view.len
        finally:
            PyBuffer_Release(&view)

    def queue_address(self, Address address, int ftype=T_ADDRESS):
        """Queue an ADDRESS frame carrying ``address``."""
        cdef Py_ssize_t n = address._packed_size()
        if self._closed:
            return
        self._reserve(HDR + n)
        self._release_at = -1
        self._put_header(ftype, n)
        address._pack_into(self._wbuf + self._wlen)
        self._wlen += n

    def queue_inline(self, Address address, buffer):
        """Queue an INLINE frame: ``address`` followed by the bytes of ``buffer``.

        The payload is not copied: the stream holds an export of ``buffer``
        (so its memory stays valid and cannot be resized) until :meth:`flush`
        has sent it, or the stream is closed, and then lets it go.

        Raises
        ------
        ValueError
            If ``address`` lacks ``FLAG_INLINE``, its length is not the
            buffer's, or the frame would exceed 2**32-1 bytes.
        """
        cdef Py_buffer view
        cdef Py_ssize_t n = address._packed_size()
        cdef Py_ssize_t cap
        cdef _Chunk *chunks
        cdef bint kept = False
        if self._closed:
            return
        if not (address.flags & FLAG_INL):
            raise ValueError("an INLINE frame's address must have FLAG_INLINE set")
        PyObject_GetBuffer(buffer, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            if <uint64_t>view.len != address.length:
                raise ValueError(
                    f"address length {address.length} is not the payload's {view.len} bytes")
            if <uint64_t>n + <uint64_t>view.len > 0xFFFFFFFF:
                raise ValueError("INLINE frame too large")
            self._reserve(HDR + n)
            if view.len > 0 and self._nchunks == self._chunks_cap:
                cap = 8 if self._chunks_cap == 0 else self._chunks_cap * 2
                chunks = <_Chunk *>PyMem_Realloc(self._chunks, cap * sizeof(_Chunk))
                if chunks == NULL:
                    raise MemoryError()
                self._chunks = chunks
                self._chunks_cap = cap
            self._release_at = -1
            self._put_header(T_INLINE, n + view.len)
            address._pack_into(self._wbuf + self._wlen)
            self._wlen += n
            if view.len > 0:
                self._chunks[self._nchunks].at = self._wlen
                self._chunks[self._nchunks].view = view
                self._nchunks += 1
                self._chunk_bytes += view.len
                kept = True
        finally:
            if not kept:
                PyBuffer_Release(&view)

    def queue_release(self, segment_id, slot, generation):
        """Queue the release of a slot; consecutive releases share one frame."""
        if self._queue_release(_u32(segment_id, "segment_id"), _u32(slot, "slot"),
                               _u64(generation, "generation")) < 0:
            raise MemoryError()

    cdef int _queue_release(self, uint32_t segment_id, uint32_t slot,
                            uint64_t generation) noexcept:
        cdef char *frame
        cdef char *p
        cdef uint32_t count
        cdef Py_ssize_t need, cap
        cdef char *buf
        if self._closed:
            return 0
        if self._sending:
            # Another thread (a Message dropped there) while flush() sends from _wbuf
            # without the GIL: _wbuf must not move, so park the entry aside.
            if self._side_len + RELEASE_ENTRY_SIZE > self._side_cap:
                cap = 256 if self._side_cap == 0 else self._side_cap * 2
                buf = <char *>PyMem_Realloc(self._side, cap)
                if buf == NULL:
                    return -1
                self._side = buf
                self._side_cap = cap
            p = self._side + self._side_len
            fastshm_put_u32(p, segment_id)
            fastshm_put_u32(p + 4, slot)
            fastshm_put_u64(p + 8, generation)
            self._side_len += RELEASE_ENTRY_SIZE
            return 0
        need = RELEASE_ENTRY_SIZE + (0 if self._release_at >= 0 else HDR + 8)
        if self._wlen + need > self._wcap:
            cap = self._wcap * 2
            while cap < self._wlen + need:
                cap *= 2
            buf = <char *>PyMem_Realloc(self._wbuf, cap)
            if buf == NULL:
                return -1
            self._wbuf = buf
            self._wcap = cap
        if self._release_at < 0:
            self._release_at = self._wlen
            self._put_header(T_RELEASE, 8)
            fastshm_put_u32(self._wbuf + self._wlen, 0)
            fastshm_put_u32(self._wbuf + self._wlen + 4, 0)
            self._wlen += 8
        frame = self._wbuf + self._release_at
        count = fastshm_get_u32(frame + HDR) + 1
        p = self._wbuf + self._wlen
        fastshm_put_u32(p, segment_id)
        fastshm_put_u32(p + 4, slot)
        fastshm_put_u64(p + 8, generation)
        self._wlen += RELEASE_ENTRY_SIZE
        self.releases_queued += 1
        fastshm_put_u32(frame + HDR, count)
        fastshm_put_u32(frame + 4, 8 + count * RELEASE_ENTRY_SIZE)
        if count >= MAX_RELEASES:
            self._release_at = -1
        return 0

    cdef void _merge_side(self) noexcept:
        """Queue the releases parked while a send was in flight."""
        cdef Py_ssize_t i
        cdef char *p
        if self._side_len == 0 or self._sending:
            return
        for i in range(0, self._side_len, RELEASE_ENTRY_SIZE):
            p = self._side + i
            self._queue_release(fastshm_get_u32(p), fastshm_get_u32(p + 4),
                                fastshm_get_u64(p + 8))
        self._side_len = 0

    def flush(self, timeout=None):
        """Send what is queued; wait for the socket up to ``timeout`` seconds.

        ``timeout=0`` sends what the kernel takes now without waiting.

        Returns
        -------
        int
            Bytes still queued (0 when everything went out).

        Raises
        ------
        ConnectionError
            ``BrokenPipeError`` / ``ConnectionResetError`` when the peer is gone.
        """
        cdef double deadline = _deadline(timeout)
        cdef ssize_t n
        cdef int err, k
        cdef Py_ssize_t i, pos, off
        cdef iovec iov[MAX_IOV]
        cdef msghdr msg
        if self._closed:
            return 0
        self._merge_side()
        while self._wlen + self._chunk_bytes > 0:
            # Gather [queued bytes, payload, queued bytes, payload, ...].
            k = 0
            pos = 0
            i = 0
            while i < self._nchunks and k < MAX_IOV - 1:
                if self._chunks[i].at > pos:
                    iov[k].iov_base = self._wbuf + pos
                    iov[k].iov_len = <size_t>(self._chunks[i].at - pos)
                    k += 1
                    pos = self._chunks[i].at
                off = self._chunk_off if i == 0 else 0
                iov[k].iov_base = <char *>self._chunks[i].view.buf + off
                iov[k].iov_len = <size_t>(self._chunks[i].view.len - off)
                k += 1
                i += 1
            if i == self._nchunks and pos < self._wlen and k < MAX_IOV:
                iov[k].iov_base = self._wbuf + pos
                iov[k].iov_len = <size_t>(self._wlen - pos)
                k += 1
            memset_msghdr(&msg, iov, <size_t>k)
            self._sending = True
            with nogil:
                n = sendmsg(self._fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
                err = errno
            self._sending = False
            if n >= 0:
                self._consume(n)
                self._merge_side()
                continue
            self._merge_side()
            if err == EINTR:
                PyErr_CheckSignals()
            elif err == EAGAIN:
                if timeout is not None and timeout == 0:
                    break
                if not _wait_fd(self._fd, POLLOUT, deadline):
                    break
            else:
                _raise_errno(err, None)
        return self._wlen + self._chunk_bytes

    cdef void _consume(self, Py_ssize_t sent) noexcept:
        """Forget ``sent`` bytes from the front of the output; let go of sent payloads."""
        cdef Py_ssize_t wdone = 0, done = 0, nxt, take, j
        if sent <= 0:
            return
        self.bytes_sent += sent
        while sent > 0:
            nxt = self._chunks[done].at if done < self._nchunks else self._wlen
            if done >= self._nchunks and nxt <= wdone:
                break  # the kernel never reports more than it was given
            if nxt > wdone:
                take = min(sent, nxt - wdone)
                wdone += take
                sent -= take
            else:
                take = min(sent, self._chunks[done].view.len - self._chunk_off)
                self._chunk_off += take
                self._chunk_bytes -= take
                sent -= take
                if self._chunk_off == self._chunks[done].view.len:
                    PyBuffer_Release(&self._chunks[done].view)
                    done += 1
                    self._chunk_off = 0
        if done:
            for j in range(done, self._nchunks):
                self._chunks[j - done] = self._chunks[j]
            self._nchunks -= done
        for j in range(self._nchunks):
            self._chunks[j].at -= wdone
        if wdone >= self._wlen:
            self._wlen = 0
            self._release_at = -1
            return
        if wdone > 0:
            memmove(self._wbuf, self._wbuf + wdone, self._wlen - wdone)
            self._wlen -= wdone
            if self._release_at >= 0:
                self._release_at = -1 if self._release_at < wdone else self._release_at - wdone

    def fill(self, timeout=None):
        """Receive what is available, waiting up to ``timeout`` seconds for some.

        Returns
        -------
        int
            Bytes received (0 when the timeout passed first).

        Raises
        ------
        Disconnected
            When the peer closed the connection.
        ConnectionError
            When the connection failed.
        """
        cdef double deadline = -1.0
        cdef bint waited = False
        cdef ssize_t n
        cdef int err
        cdef char *dst
        cdef Py_ssize_t room
        if self._in_payload is not None:
            # An INLINE payload goes straight into its own buffer.
            room = len(self._in_payload) - self._in_have
            if room == 0:
                return 0  # complete: next_frame() hands it out
            dst = PyByteArray_AS_STRING(self._in_payload) + self._in_have
        else:
            self._make_room(0)
            if self._rend == self._rcap:
                return 0  # the buffer holds whole frames: parse them first
            dst = self._rbuf + self._rend
            room = self._rcap - self._rend
        while True:
            with nogil:
                n = recv(self._fd, dst, <size_t>room, MSG_DONTWAIT)
                err = errno
            if n > 0:
                if self._in_payload is not None:
                    self._in_have += n
                else:
                    self._rend += n
                self.bytes_received += n
                return n
            if n == 0:
                raise Disconnected("peer closed the connection")
            if err == EINTR:
                PyErr_CheckSignals()
            elif err == EAGAIN:
                if timeout is not None and timeout == 0:
                    return 0
                if not waited:
                    deadline = _deadline(timeout)
                    waited = True
                if not _wait_fd(self._fd, POLLIN, deadline):
                    return 0
            else:
                _raise_errno(err, None)

    cdef int _make_room(self, Py_ssize_t frame_size) except -1:
        """Make free space at the end of the read buffer (for a whole frame, if given)."""
        cdef Py_ssize_t have = self._rend - self._rstart
        cdef Py_ssize_t cap
        cdef char *buf
        if self._rstart > 0 and (self._rend == self._rcap or frame_size > self._rcap - self._rstart):
            memmove(self._rbuf, self._rbuf + self._rstart, have)
            self._rstart = 0
            self._rend = have
        if frame_size > self._rcap:
            cap = self._rcap
            while cap < frame_size:
                cap *= 2
            buf = <char *>PyMem_Realloc(self._rbuf, cap)
            if buf == NULL:
                raise MemoryError()
            self._rbuf = buf
            self._rcap = cap
        return 0

    cdef object _start_inline(self, const char *p, Py_ssize_t avail, uint32_t blen):
        """Begin receiving a large INLINE payload straight into its own buffer.

        Once the address is buffered, the payload's buffer is made and what
        already arrived is moved into it; :meth:`fill` receives the rest there,
        without passing through the read buffer.
        """
        cdef Py_ssize_t alen = 0, have
        cdef Py_ssize_t head
        if avail < HDR + ADDR_FIXED:
            return None
        head = ADDR_FIXED + <unsigned char>p[HDR + 52] + fastshm_get_u16(p + HDR + 54)
        if avail < HDR + head and head <= <Py_ssize_t>blen:
            return None  # the address itself is not all here yet (it fits the buffer)
        self._in_address = _inline_address(p + HDR, blen, &alen)
        have = avail - HDR - alen
        self._in_payload = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>blen - alen)
        _copy(PyByteArray_AS_STRING(self._in_payload), p + HDR + alen, have)
        self._in_have = have
        self._rstart = self._rend = 0
        return None

    def next_frame(self):
        """Return the next whole frame received, or ``None`` if there is none yet.

        Returns
        -------
        tuple or None
            ``(frame_type, body)``: body is an :class:`Address` for ADDRESS
            frames, ``(Address, bytearray)`` for INLINE frames (checked
            against ``max_inline``, 0 until a handshake raises it) and
            ``bytes`` for every other type.

        Raises
        ------
        ProtocolError
            On a wrong magic or version, or a body longer than ``max_body``.
        """
        cdef Py_ssize_t avail = self._rend - self._rstart
        cdef const char *p
        cdef uint32_t blen
        cdef int ftype
        cdef Py_ssize_t limit
        cdef object body
        if self._in_payload is not None:
            if self._in_have < len(self._in_payload):
                return None
            body = (self._in_address, self._in_payload)
            self._in_address = None
            self._in_payload = None
            self._in_have = 0
            return (T_INLINE, body)
        if avail < HDR:
            return None
        p = self._rbuf + self._rstart
        if fastshm_get_u16(p) != 0x5346:
            raise ProtocolError(f"bad frame magic {fastshm_get_u16(p):#06x}")
        if <unsigned char>p[2] != 1:
            raise ProtocolError(f"unsupported frame version {<unsigned char>p[2]}")
        ftype = <unsigned char>p[3]
        blen = fastshm_get_u32(p + 4)
        limit = self.max_inline if ftype == T_INLINE else self.max_body
        if blen > <uint64_t>limit:
            if ftype == T_INLINE:
                raise ProtocolError(f"INLINE frame of {blen} bytes exceeds the limit of "
                                    f"{limit} agreed in the handshake")
            raise ProtocolError(f"frame of {blen} bytes exceeds the limit of {limit}")
        if avail < HDR + <Py_ssize_t>blen:
            if ftype == T_INLINE and blen >= NOGIL_COPY:
                return self._start_inline(p, avail, blen)
            if HDR + <Py_ssize_t>blen > self._rcap - self._rstart:
                self._make_room(HDR + blen)
            return None
        self._rstart += HDR + blen
        if ftype == T_ADDRESS:
            body = _address_from(p + HDR, blen)
        elif ftype == T_INLINE:
            body = _inline_from(p + HDR, blen)
        else:
            body = PyBytes_FromStringAndSize(p + HDR, blen)
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        return (ftype, body)


cdef Address _inline_address(const char *p, Py_ssize_t n, Py_ssize_t *alen):
    """Parse and check the address at the start of an INLINE body of ``n`` bytes."""
    cdef Address a
    if n < ADDR_FIXED:
        raise ProtocolError(f"INLINE frame of {n} bytes is shorter than an address")
    alen[0] = ADDR_FIXED + <unsigned char>p[52] + fastshm_get_u16(p + 54)
    if alen[0] > n:
        raise ProtocolError(f"INLINE frame of {n} bytes is shorter than its address ({alen[0]})")
    a = _address_from(p, alen[0])
    if not (a.flags & FLAG_INL):
        raise ProtocolError("INLINE frame's address lacks FLAG_INLINE")
    if a.length != <uint64_t>(n - alen[0]):
        raise ProtocolError(
            f"INLINE address says {a.length} bytes but the frame carries {n - alen[0]}")
    return a


cdef tuple _inline_from(const char *p, Py_ssize_t n):
    """Split an INLINE body into its address and a private copy of the payload."""
    cdef Py_ssize_t alen = 0
    cdef Address a = _inline_address(p, n, &alen)
    cdef bytearray payload
    payload = PyByteArray_FromStringAndSize(NULL, n - alen)
    _copy(PyByteArray_AS_STRING(payload), p + alen, n - alen)
    return (a, payload)


cdef inline void memset_msghdr(msghdr *msg, iovec *iov, size_t n) noexcept:
    msg.msg_name = NULL
    msg.msg_namelen = 0
    msg.msg_iov = iov
    msg.msg_iovlen = n
    msg.msg_control = NULL
    msg.msg_controllen = 0
    msg.msg_flags = 0


# --- the reader's side: announced segments and messages -------------------------

def segment_layout(Py_ssize_t slot_size, Py_ssize_t slots, Py_ssize_t page_size=4096):
    """Geometry of a pool segment: ``(data_offset, slot_stride, total_size)``.

    The header and slot table come first, rounded up to ``page_size``; each
    slot is rounded up to ``page_size`` when it is at least a page, else to 64
    bytes, so numpy views of a slot are aligned.
    """
    if slot_size <= 0 or slots <= 0:
        raise ValueError("slot_size and slots must be positive")
    if slots > 0xFFFFFFF:
        raise ValueError("too many slots")
    header = HEADER_SIZE + slots * ENTRY_SIZE
    data_offset = -(-header // page_size) * page_size
    align = page_size if slot_size >= page_size else 64
    stride = -(-slot_size // align) * align
    return data_offset, stride, data_offset + slots * stride


cdef class PeerSegment:
    """A segment a peer announced, mapped read-only, with its announced geometry.

    The geometry is checked against the size this process mapped (``fstat``),
    never against what the segment's header says alone; every address is then
    checked against both before a :class:`Message` points into the mapping.
    """

    def __init__(self, Segment segment, segment_id, slot_count, data_offset,
                 slot_stride, slot_size):
        cdef uint64_t size = <uint64_t>segment._size
        segment._check_open()
        self.segment = segment
        self.segment_id = _u32(segment_id, "segment_id")
        self.slot_count = _u32(slot_count, "slot_count")
        self.data_offset = _u64(data_offset, "data_offset")
        self.slot_stride = _u64(slot_stride, "slot_stride")
        self.slot_size = _u64(slot_size, "slot_size")
        if self.slot_count == 0 or self.slot_size == 0 or self.slot_size > self.slot_stride:
            raise ProtocolError("announced slot geometry is empty or inconsistent")
        if self.data_offset % 64 or self.slot_stride % 64:
            raise ProtocolError("announced slots are not 64-byte aligned")
        if HEADER_SIZE + <uint64_t>self.slot_count * ENTRY_SIZE > self.data_offset:
            raise ProtocolError("announced data offset overlaps the slot table")
        if self.data_offset > size or (size - self.data_offset) // self.slot_stride < self.slot_count:
            raise ProtocolError(
                f"announced slots ({self.slot_count} x {self.slot_stride} bytes at "
                f"{self.data_offset}) do not fit in the {size} bytes mapped")
        if memcmp(segment._addr, b"FASTSHM\x00", 8) != 0:
            raise ProtocolError(f"segment '/{segment._name}' is not a fastshm pool segment")

    cpdef Message message(self, Address address, Stream releaser):
        """Check ``address`` against this segment and return a view of its payload.

        Raises
        ------
        ProtocolError
            If the address is for another segment, or its slot or span is
            outside the announced, mapped geometry.
        GenerationError
            If the slot's generation in the header is not the address's.
        """
        cdef uint64_t start
        cdef Message m
        cdef uint64_t current
        if address.segment_id != self.segment_id:
            raise ProtocolError("address names another segment")
        if address.slot >= self.slot_count:
            raise ProtocolError(f"address slot {address.slot} >= slot count {self.slot_count}")
        start = self.data_offset + address.slot * self.slot_stride
        if (address.offset < start or address.length > self.slot_size
                or address.offset - start > self.slot_size - address.length):
            raise ProtocolError(
                f"address span [{address.offset}, +{address.length}) is outside slot "
                f"{address.slot}")
        self.segment._check_open()
        current = fastshm_load_acquire_u64(
            self.segment._addr + HEADER_SIZE + <Py_ssize_t>address.slot * ENTRY_SIZE)
        if current != address.generation:
            raise GenerationError(
                f"slot {address.slot} of segment '/{self.segment._name}' is at generation "
                f"{current}, the address says {address.generation}: stale or forged address")
        m = Message.__new__(Message)
        m._segment = self.segment
        m._ptr = self.segment._addr + address.offset
        m._nbytes = <Py_ssize_t>address.length
        m.address = address
        m._releaser = releaser
        self.segment._exports += 1
        return m


@cython.no_gc_clear
cdef class Message:
    """One received payload: a read-only, zero-copy view of its slot.

    Use it as a buffer (``memoryview(msg)``, ``bytes(msg)``, ``numpy``
    functions).  The slot goes back to the publisher when the message is
    released: by :meth:`release`, by leaving ``with msg:``, or when the message
    and every view of it are gone.  Releasing while views are alive raises
    ``BufferError``.
    """

    def __init__(self):
        raise TypeError("messages come from Subscriber.receive()")

    @staticmethod
    def _local(buffer, Address address):
        """A message that owns a private copy of its payload (no slot to release)."""
        cdef Message m = Message.__new__(Message)
        cdef Py_buffer view
        # The memoryview holds the export, so the memory cannot move or shrink.
        owner = memoryview(buffer)
        PyObject_GetBuffer(owner, &view, PyBUF_ANY_CONTIGUOUS)
        m._ptr = <const char *>view.buf
        m._nbytes = view.len
        PyBuffer_Release(&view)
        m._buffer_owner = owner
        m.address = address
        return m

    @property
    def seq(self):
        """The message's sequence number."""
        return self.address.sequence

    @property
    def nbytes(self):
        """The payload's length in bytes."""
        return self._nbytes

    @property
    def timestamp_ns(self):
        """``time.time_ns()`` at the publisher when the message was sent."""
        return self.address.timestamp_ns

    @property
    def meta(self):
        """The metadata bytes the sender attached (after any array descriptor)."""
        cdef bytes m = self.address.meta
        if self.address.flags & FLAG_NDARRAY and len(m) >= 2:
            return m[2 + m[1] + 8 * m[0]:]
        return m

    def array(self):
        """A read-only numpy view of the payload, with the dtype and shape it was sent with.

        Payloads that were not arrays come as 1-D ``uint8``.  The view keeps the
        message, and so its slot, alive; releasing the message while the view
        exists raises ``BufferError``.  Needs numpy.
        """
        from fastshm.arrays import message_array
        return message_array(self)

    @property
    def inline(self):
        """True when the payload came through the connection, not shared memory."""
        return bool(self.address.flags & FLAG_INLINE)

    @property
    def released(self):
        """True once the slot was given back."""
        return self._released

    def tobytes(self):
        """A copy of the payload as ``bytes``."""
        self._check_alive()
        return PyBytes_FromStringAndSize(self._ptr, self._nbytes)

    def _check_alive(self):
        if self._released:
            raise ValueError(f"message {self.address.sequence} was released")

    def release(self):
        """Give the slot back to the publisher now.  Releasing twice is harmless.

        Raises
        ------
        BufferError
            If views of the message are still alive.
        """
        if self._released:
            return
        if self._exports > 0:
            raise BufferError(
                f"cannot release message {self.address.sequence}: {self._exports} view(s) "
                f"of it are still alive")
        self._give_back()

    cdef void _give_back(self) noexcept:
        if self._released:
            return
        self._released = True
        self._ptr = NULL
        if self._releaser is not None:
            self._releaser._queue_release(self.address.segment_id, self.address.slot,
                                          self.address.generation)
            self._releaser = None
        if self._segment is not None:
            self._segment._exports -= 1
            self._segment = None
        self._buffer_owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self._check_alive()
        PyBuffer_FillInfo(buffer, self, <void *>self._ptr, self._nbytes, 1, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    def __len__(self):
        return self._nbytes

    def __bytes__(self):
        return self.tobytes()

    def __repr__(self):
        state = " released" if self._released else ""
        return f"<fastshm.Message seq={self.address.sequence} nbytes={self._nbytes}{state}>"

    def __dealloc__(self):
        self._give_back()


def buffers_equal(a, b):
    """True when two contiguous buffers hold the same bytes (``memcmp``, GIL released)."""
    cdef Py_buffer va, vb
    cdef int rc = 0
    PyObject_GetBuffer(a, &va, PyBUF_ANY_CONTIGUOUS)
    try:
        PyObject_GetBuffer(b, &vb, PyBUF_ANY_CONTIGUOUS)
        try:
            if va.len != vb.len:
                return False
            if va.len >= NOGIL_COPY:
                with nogil:
                    rc = memcmp(va.buf, vb.buf, <size_t>va.len)
            elif va.len > 0:
                rc = memcmp(va.buf, vb.buf, <size_t>va.len)
            return rc == 0
        finally:
            PyBuffer_Release(&vb)
    finally:
        PyBuffer_Release(&va)
