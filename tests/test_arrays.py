"""numpy without copies: arrays sent with dtype and shape, read-only views of slots."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")

from fastshm import ProtocolError, Publisher, Subscriber  # noqa: E402
from fastshm.arrays import pack_array_meta, unpack_array_meta  # noqa: E402
from handshakes import connect


@pytest.fixture
def pair(route):
    pub = Publisher(route, slot_size=1 << 20, slots=4)
    sub = Subscriber(pub.url)
    connect(pub, sub)
    yield pub, sub
    sub.close()
    pub.close()


@pytest.mark.parametrize("dtype", ["uint8", "float32", ">i4", "complex128", "bool", "<U3"])
def test_array_roundtrip_keeps_dtype_and_shape(pair, dtype):
    pub, sub = pair
    a = (np.arange(2 * 3 * 4) % 7).astype(dtype).reshape(2, 3, 4)
    pub.send(a, meta=b"user")
    msg = sub.receive(timeout=5)
    b = msg.array()
    assert b.dtype == a.dtype and b.shape == a.shape
    assert np.array_equal(a, b)
    assert not b.flags.writeable
    assert msg.meta == b"user"
    del b
    msg.release()


def test_array_view_is_zero_copy_and_pins_the_slot(pair):
    pub, sub = pair
    pub.send(np.ones((480, 640, 3), dtype=np.uint8))
    msg = sub.receive(timeout=5)
    view = msg.array()
    assert np.shares_memory(view, np.frombuffer(msg, dtype=np.uint8))
    with pytest.raises(BufferError):
        msg.release()  # a view outliving release() is impossible
    del msg  # the view keeps the message, and its slot, alive
    sub.receive(timeout=0.1)
    pub.poll(0.1)
    assert pub.stats()["slots_held"] == 1
    del view
    sub.receive(timeout=0.1)
    pub.poll(0.1)
    assert pub.stats()["slots_held"] == 0


def test_non_contiguous_arrays_are_copied_straight_into_the_slot(pair):
    pub, sub = pair
    a = np.arange(100 * 60, dtype=np.int16).reshape(100, 60)[:, ::3]
    assert not a.flags.c_contiguous
    assert pub.send(a) == 1
    with sub.receive(timeout=5) as msg:
        got = msg.array()
        assert np.array_equal(got, a) and got.shape == (100, 20)
        del got


def test_object_arrays_are_refused(pair):
    pub, _ = pair
    with pytest.raises(ValueError, match="dtype"):
        pub.send(np.array([object(), 1], dtype=object))


def test_plain_payloads_come_as_bytes_arrays(pair):
    pub, sub = pair
    pub.send(b"abc")
    with sub.receive(timeout=5) as msg:
        got = msg.array()
        assert got.dtype == np.uint8 and bytes(got) == b"abc"
        del got


def test_loan_array_fills_a_slot_in_place(pair):
    pub, sub = pair
    with pub.loan_array((4, 5), "float64") as arr:
        arr[:] = np.arange(20).reshape(4, 5)
    del arr
    with sub.receive(timeout=5) as msg:
        got = msg.array()
        assert got.shape == (4, 5) and got.dtype == np.float64 and got[3, 4] == 19
        del got
    # An array kept past the block keeps its slot out of reuse until it is gone.
    with pub.loan_array(3, "uint8") as kept:
        kept[:] = 7
    with sub.receive(timeout=5) as msg:
        assert bytes(msg) == b"\x07\x07\x07"
    sub.receive(timeout=0.05)
    pub.poll(0.1)
    assert pub.stats()["slots_held"] == 1
    del kept
    assert pub.stats()["slots_held"] == 0


def test_exception_inside_loan_array_discards_once_the_array_is_gone(pair):
    pub, sub = pair
    with pytest.raises(RuntimeError):
        with pub.loan_array((2, 2), "int32") as arr:
            arr[:] = 1
            raise RuntimeError("no frame")
    del arr
    assert pub.stats()["slots_free"] == 4
    assert sub.receive(timeout=0.2) is None


def test_array_metadata_is_checked():
    meta = pack_array_meta(np.dtype("<f4"), (2, 3))
    assert unpack_array_meta(meta) == ("<f4", (2, 3), len(meta))
    for bad in [b"", b"\x01", b"\x01\x03<f4", b"\x00\x02|O", b"\x40\x02<f"]:
        with pytest.raises(ProtocolError):
            unpack_array_meta(bad)


def test_array_metadata_that_lies_about_the_size_is_refused(pair):
    pub, sub = pair
    from fastshm._core import FLAG_NDARRAY
    slot = pub._take_slot(1, 10)
    pub._pool.segment.write(pub._pool.offset(slot), b"x" * 10)
    pub._publish(slot, 10, pack_array_meta(np.dtype("<f8"), (100,)), 0, FLAG_NDARRAY)
    with sub.receive(timeout=5) as msg:
        with pytest.raises(ProtocolError, match="does not describe"):
            msg.array()
