"""numpy without copies: array metadata in addresses, array views of messages.

numpy is optional (``pip install fastshm[numpy]``); this module imports it
only when an array is actually sent or asked for.

An array's dtype and shape travel in the address's metadata, ahead of any
metadata of the caller's, when the address has ``FLAG_NDARRAY``::

    u8 ndim | u8 dtype_len | dtype.str (ASCII, e.g. "<f4") | ndim x u64 shape

The reader checks that the shape and dtype describe exactly the payload's
length before it makes a view; object dtypes (pointers) are refused.
"""

from __future__ import annotations

import struct
from typing import Any, Tuple, cast

from fastshm._core import FLAG_NDARRAY, Message
from fastshm.errors import ProtocolError

__all__ = ["is_ndarray", "pack_array_meta", "unpack_array_meta", "message_array", "MAX_NDIM"]

MAX_NDIM = 32
_DTYPE_CHARS = frozenset(b"<>|=bBiufcmMSUVa0123456789[]")


def is_ndarray(obj: Any) -> bool:
    """True for a numpy ndarray, without importing numpy."""
    return type(obj).__module__ == "numpy" and hasattr(obj, "__array_interface__")


def pack_array_meta(dtype: Any, shape: Tuple[int, ...]) -> bytes:
    """The metadata descriptor of an array of ``dtype`` (a numpy dtype) and ``shape``.

    Raises
    ------
    ValueError
        For object or structured dtypes, or more than 32 dimensions.
    """
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"cannot send arrays of dtype {dtype}: only plain numeric, bool, "
                         f"bytes and unicode dtypes travel through shared memory")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"arrays of more than {MAX_NDIM} dimensions are not supported")
    code = dtype.str.encode("ascii")
    return struct.pack(f"<BB{len(code)}s{len(shape)}Q", len(shape), len(code), code, *shape)


def unpack_array_meta(meta: bytes) -> Tuple[str, Tuple[int, ...], int]:
    """Parse a descriptor: ``(dtype_str, shape, descriptor_length)``.

    Raises
    ------
    ProtocolError
        If the descriptor is truncated or names a dtype that is not allowed.
    """
    if len(meta) < 2:
        raise ProtocolError("array metadata is truncated")
    ndim, dlen = meta[0], meta[1]
    end = 2 + dlen + 8 * ndim
    if ndim > MAX_NDIM or dlen == 0 or len(meta) < end:
        raise ProtocolError("array metadata is truncated or malformed")
    code = meta[2:2 + dlen]
    if not set(code) <= _DTYPE_CHARS or b"O" in code:
        raise ProtocolError(f"array metadata names a refused dtype {code!r}")
    shape = struct.unpack_from(f"<{ndim}Q", meta, 2 + dlen)
    return code.decode("ascii"), shape, end


def message_array(msg: Message) -> Any:
    """A read-only ndarray view of ``msg``'s payload (see :meth:`Message.array`)."""
    import numpy as np

    address = msg.address
    if not address.flags & FLAG_NDARRAY:
        return np.frombuffer(cast(Any, msg), dtype=np.uint8)
    code, shape, _ = unpack_array_meta(address.meta)
    try:
        dtype = np.dtype(code)
    except TypeError:
        raise ProtocolError(f"array metadata names an unknown dtype {code!r}") from None
    count = 1
    for n in shape:
        count *= n
    if dtype.hasobject or count * dtype.itemsize != msg.nbytes:
        raise ProtocolError(
            f"array metadata ({code}, shape {shape}) does not describe {msg.nbytes} bytes")
    return np.frombuffer(cast(Any, msg), dtype=dtype, count=count).reshape(shape)
