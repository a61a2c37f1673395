"""fastshm.Segment: creation, mapping, bounds, read-only views, ownership."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from fastshm import Segment


@pytest.fixture
def segment():
    seg = Segment.create(8192)
    yield seg
    seg.close()
    seg.unlink()


def test_create_gives_an_unguessable_owner_only_name(segment):
    assert segment.name.startswith("fastshm.")
    assert len(segment.name) >= len("fastshm.") + 24
    assert segment.owner and not segment.readonly and segment.size == 8192
    mode = os.stat(f"/dev/shm/{segment.name}").st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_size_is_exactly_what_was_asked():
    with Segment.create(1000) as seg:
        assert seg.size == 1000
        assert Segment.open(seg.name).size == 1000


def test_mode_is_applied_despite_umask():
    old = os.umask(0o077)
    try:
        with Segment.create(4096, mode=0o640) as seg:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{seg.name}").st_mode) == 0o640
    finally:
        os.umask(old)


def test_write_then_read_in_another_mapping(segment):
    assert segment.write(100, b"hello") == 5
    other = Segment.open(segment.name)
    assert other.read(100, 5) == b"hello"
    buf = bytearray(5)
    assert other.read_into(100, buf) == 5 and buf == b"hello"
    assert bytes(memoryview(other)[100:105]) == b"hello"
    other.close()


def test_large_copy_releases_the_gil_and_is_exact():
    data = os.urandom(3 << 20)
    with Segment.create(len(data)) as seg:
        seg.write(0, data)
        assert seg.read(0, len(data)) == data


@pytest.mark.parametrize("offset,length", [(-1, 1), (8192, 1), (8000, 193), (0, 8193),
                                           (2**62, 1)])
def test_writes_and_reads_outside_the_segment_fail(segment, offset, length):
    with pytest.raises((IndexError, OverflowError)):
        segment.write(offset, b"x" * min(length, 9000))
    with pytest.raises((IndexError, OverflowError, ValueError)):
        segment.read(offset, length)


def test_write_respects_a_limit(segment):
    with pytest.raises(ValueError, match="does not fit"):
        segment.write(0, b"x" * 11, limit=10)


def test_reader_view_is_read_only(segment):
    reader = Segment.open(segment.name)
    view = memoryview(reader)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    with pytest.raises(PermissionError):
        reader.write(0, b"x")
    view.release()
    reader.close()


def test_writable_view_writes_through(segment):
    with memoryview(segment) as view:
        view[0:3] = b"abc"
    assert Segment.open(segment.name).read(0, 3) == b"abc"


def test_close_with_live_views_raises_buffer_error(segment):
    view = memoryview(segment)
    with pytest.raises(BufferError, match="still alive"):
        segment.close()
    assert segment.exports == 1
    view.release()
    segment.close()
    assert segment.closed
    with pytest.raises(ValueError, match="closed"):
        segment.read(0, 1)


def test_open_missing_segment_names_it():
    with pytest.raises(FileNotFoundError) as info:
        Segment.open("fastshm.does-not-exist")
    assert info.value.filename == "/fastshm.does-not-exist"


def test_create_existing_name_fails(segment):
    with pytest.raises(FileExistsError):
        Segment.create(4096, name=segment.name)


@pytest.mark.parametrize("name", ["", "/", "a/b", "..", ".", "x" * 201, "spa ce", "ünï", "/a/"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid segment name"):
        Segment.create(4096, name=name)
    with pytest.raises(ValueError):
        Segment.open(name)


def test_non_positive_size_is_refused():
    with pytest.raises(ValueError):
        Segment.create(0)
    with pytest.raises(ValueError):
        Segment.create(-5)


def test_only_the_creator_unlinks(segment):
    reader = Segment.open(segment.name)
    with pytest.raises(PermissionError, match="only its creator"):
        reader.unlink()
    reader.close()
    assert os.path.exists(f"/dev/shm/{segment.name}")


def test_mapping_survives_unlink():
    seg = Segment.create(4096)
    seg.write(0, b"still here")
    reader = Segment.open(seg.name)
    seg.unlink()
    assert not os.path.exists(f"/dev/shm/{seg.name}")
    assert reader.read(0, 10) == b"still here"
    reader.close()
    seg.close()


def test_context_manager_closes_and_unlinks():
    with Segment.create(4096) as seg:
        name = seg.name
    assert seg.closed
    assert not os.path.exists(f"/dev/shm/{name}")


def test_dropping_the_creator_unlinks():
    seg = Segment.create(4096)
    name = seg.name
    del seg
    assert not os.path.exists(f"/dev/shm/{name}")


def test_full_dev_shm_fails_at_creation_with_the_numbers():
    free = os.statvfs("/dev/shm")
    too_big = free.f_bavail * free.f_frsize + (1 << 30)
    with pytest.raises(OSError) as info:
        Segment.create(too_big)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert str(too_big) in message and "bytes free" in message and "--shm-size" in message


def test_owner_alive_follows_the_creators_lock():
    seg = Segment.create(4096)
    assert Segment.owner_alive(seg.name)
    seg.close()  # drops the lock; the name stays
    assert not Segment.owner_alive(seg.name)
    seg.unlink()


def test_atomic_u64_roundtrip(segment):
    segment.store_u64(128, 2**64 - 1)
    assert Segment.open(segment.name).load_u64(128) == 2**64 - 1
    with pytest.raises(ValueError, match="aligned"):
        segment.load_u64(3)
    with pytest.raises(IndexError):
        segment.load_u64(8192)


def test_direct_construction_is_refused():
    with pytest.raises(TypeError):
        Segment()


def test_close_from_another_thread_waits_for_a_copy_in_flight():
    import threading

    data = bytes(64 << 20)
    with Segment.create(len(data)) as seg:
        errors = []
        started = threading.Event()

        def closer():
            started.wait()
            try:
                seg.close()
            except BufferError as exc:
                errors.append(exc)

        t = threading.Thread(target=closer)
        t.start()
        for _ in range(5):
            started.set()
            try:
                seg.write(0, data)  # the GIL is released during the copy
            except ValueError:
                break  # closed between two copies: never during one
            if errors:
                break
        t.join()
        # Either the close came between copies, or it was refused during one.
        if not seg.closed:
            assert errors
