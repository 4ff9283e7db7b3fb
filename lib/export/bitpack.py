"""Bit packing: n unsigned integers of b bits each in exactly ceil(n * b / 8) bytes.

Bit order is little-endian throughout: value i occupies stream bits [i*b, (i+1)*b), its least
significant bit first, and stream bit j is bit (j % 8) of byte j // 8 (numpy's
``bitorder="little"``).  The last byte is zero-padded.  Any width 1..16 works.
"""
import numpy as np

MAX_BITS = 16
# Values per chunk: a multiple of 8, so every chunk ends on a byte boundary and the chunks'
# bytes simply concatenate; bounds the (chunk x bits) temporaries to a few MB.
_CHUNK = 1 << 18


def packed_nbytes(count, bits):
    """Bytes that ``count`` values of ``bits`` bits occupy."""
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits):
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits} outside 1..{MAX_BITS}")


def pack_bits(values, bits):
    """Pack the non-negative integers ``values`` (< 2^bits) into bytes."""
    _check_bits(bits)
    v = np.asarray(values).reshape(-1).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    shifts = np.arange(bits, dtype=np.int64)
    chunks = []
    for start in range(0, v.size, _CHUNK):
        part = v[start:start + _CHUNK]
        planes = ((part[:, None] >> shifts) & 1).astype(np.uint8)
        chunks.append(np.packbits(planes.reshape(-1), bitorder="little").tobytes())
    data = b"".join(chunks)
    assert len(data) == packed_nbytes(v.size, bits)
    return data


def unpack_bits(data, bits, count):
    """Inverse of :func:`pack_bits`: ``count`` integers (int64) from ``data``."""
    _check_bits(bits)
    if len(data) != packed_nbytes(count, bits):
        raise ValueError(f"{len(data)} bytes cannot hold exactly {count} {bits}-bit values")
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = np.left_shift(1, np.arange(bits, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK * bits // 8   # bytes per chunk of _CHUNK values
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        planes = np.unpackbits(raw[i * step:(i + 1) * step], bitorder="little", count=n * bits)
        out[start:start + n] = planes.reshape(n, bits).astype(np.int64) @ weights
    return out
