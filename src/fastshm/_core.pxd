# Declarations of fastshm._core's compiled classes (attributes live here).
from libc.stdint cimport uint32_t, uint64_t


cdef class Segment:
    cdef char *_addr
    cdef Py_ssize_t _size
    cdef int _fd
    cdef bint _readonly
    cdef bint _owner
    cdef bint _unlinked
    cdef long _creator_pid
    cdef Py_ssize_t _exports
    cdef str _name
    cdef bytes _path

    cdef int _check_open(self) except -1
    cdef int _check_span(self, Py_ssize_t offset, Py_ssize_t length) except -1


cdef class Address:
    cdef readonly uint32_t segment_id
    cdef readonly uint32_t slot
    cdef readonly uint64_t offset
    cdef readonly uint64_t length
    cdef readonly uint64_t generation
    cdef readonly uint64_t sequence
    cdef readonly uint64_t timestamp_ns
    cdef readonly uint32_t flags
    cdef readonly str name
    cdef readonly bytes meta
    cdef bytes _name_bytes

    cdef Py_ssize_t _packed_size(self)
    cdef void _pack_into(self, char *p)


cdef struct _Chunk:
    # A caller's buffer sent in place, after byte ``at`` of the write buffer.
    Py_ssize_t at
    Py_buffer view


cdef class Stream:
    cdef int _fd
    cdef object _sock
    cdef char *_rbuf
    cdef Py_ssize_t _rcap
    cdef Py_ssize_t _rstart
    cdef Py_ssize_t _rend
    cdef char *_wbuf
    cdef Py_ssize_t _wcap
    cdef Py_ssize_t _wlen
    cdef Py_ssize_t _release_at
    # Releases queued by other threads while sendmsg reads _wbuf without the GIL.
    cdef char *_side
    cdef Py_ssize_t _side_len
    cdef Py_ssize_t _side_cap
    cdef bint _sending
    cdef bint _closed
    cdef _Chunk *_chunks
    cdef Py_ssize_t _nchunks
    cdef Py_ssize_t _chunks_cap
    cdef Py_ssize_t _chunk_off
    cdef Py_ssize_t _chunk_bytes
    cdef Address _in_address
    cdef bytearray _in_payload
    cdef Py_ssize_t _in_have
    cdef public Py_ssize_t max_body
    cdef public Py_ssize_t max_inline
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long bytes_received
    cdef readonly unsigned long long releases_queued

    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef int _make_room(self, Py_ssize_t frame_size) except -1
    cdef object _start_inline(self, const char *p, Py_ssize_t avail, uint32_t blen)
    cdef void _consume(self, Py_ssize_t sent) noexcept
    cdef void _release_chunks(self) noexcept
    cdef inline void _put_header(self, int ftype, Py_ssize_t n) noexcept
    cdef int _queue_release(self, uint32_t segment_id, uint32_t slot, uint64_t generation) noexcept
    cdef void _merge_side(self) noexcept


cdef class PeerSegment:
    cdef readonly Segment segment
    cdef readonly uint32_t segment_id
    cdef readonly uint32_t slot_count
    cdef readonly uint64_t data_offset
    cdef readonly uint64_t slot_stride
    cdef readonly uint64_t slot_size

    cpdef Message message(self, Address address, Stream releaser)


cdef class Message:
    cdef Segment _segment
    cdef const char *_ptr
    cdef Py_ssize_t _nbytes
    cdef readonly Address address
    cdef Stream _releaser
    cdef Py_ssize_t _exports
    cdef bint _released
    cdef object _buffer_owner

    cdef void _give_back(self) noexcept
