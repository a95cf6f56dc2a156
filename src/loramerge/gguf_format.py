"""The GGUF container as bytes: a header parser safe on hostile input, and the few encoders a
rewrite needs. Pure functions of byte buffers, no file I/O.

Layout (ggml's gguf.cpp): magic, version, tensor count, key/value count; the key/value pairs
(typed values, arrays of them); the tensor infos (name, dims innermost first, type, offset into
the data); the data, from the next multiple of `general.alignment` (32 by default). Every length
and count is checked against the bytes that remain before it is used, so a header cannot make
the parser allocate or loop more than the file's own size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

V = GGUFValueType
_SCALARS: dict[GGUFValueType, str] = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"


class GGUFFormatError(ValueError):
    """Bytes that are not a well-formed GGUF header."""


@dataclass(frozen=True)
class Field:
    """One key/value pair: its type, decoded value and the exact bytes it was stored as."""

    key: str
    vtype: GGUFValueType
    value: object  # scalar, str, or list (arrays)
    raw: bytes


@dataclass(frozen=True)
class TensorRecord:
    """One tensor info: name, type, numpy-order shape and byte range relative to the data."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # rows first (GGUF stores the innermost dimension first)
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A parsed header: version, fields in file order, tensors in file order, data start."""

    version: int
    fields: dict[str, Field]
    tensors: dict[str, TensorRecord]
    alignment: int
    data_start: int


class NeedMore(GGUFFormatError):
    """The header goes on past the bytes given (but not past the file): read more of it."""


class _Cursor:
    def __init__(self, buf: bytes, file_size: int) -> None:
        self.buf, self.at, self.size = buf, 0, file_size

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > self.size:
            raise GGUFFormatError(
                f"header runs past the end of the file (needs {n} bytes at offset {self.at})"
            )
        if self.at + n > len(self.buf):
            raise NeedMore(f"the header is longer than {len(self.buf)} bytes")
        piece = self.buf[self.at : self.at + n]
        self.at += n
        return piece

    def unpack(self, fmt: str) -> object:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, each: int, what: str) -> int:
        """A u64 count of items of at least `each` bytes that must fit in what remains."""
        n = self.unpack("<Q")
        if n * each > self.size - self.at:
            raise GGUFFormatError(f"{what} claims {n} items, more than the file holds")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(1, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} is not UTF-8") from None


def _value(cur: _Cursor, vtype: int, what: str, nested: bool = False) -> object:
    if vtype == V.STRING:
        return cur.string(what)
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[V(vtype)])
    if vtype != V.ARRAY:
        raise GGUFFormatError(f"{what}: unknown value type {vtype}")
    itype = cur.unpack("<I")
    if itype in _SCALARS:
        fmt = _SCALARS[V(itype)]
        size = struct.calcsize(fmt)
        n = cur.count(size, what)
        return list(struct.unpack(f"<{n}{fmt[1]}", cur.take(n * size)))
    if itype == V.STRING:
        return [cur.string(what) for _ in range(cur.count(8, what))]
    if itype == V.ARRAY and not nested:
        return [_value(cur, V.ARRAY, what, True) for _ in range(cur.count(12, what))]
    raise GGUFFormatError(f"{what}: unsupported array item type {itype}")


def parse_header(buf: bytes, file_size: int) -> Header:
    """Parse and check a GGUF header held in `buf`, the file's first bytes (NeedMore when the
    header goes on past them)."""
    cur = _Cursor(buf, file_size)
    if bytes(cur.take(4)) != struct.pack("<I", GGUF_MAGIC):
        raise GGUFFormatError("not a GGUF file (bad magic)")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.count(8 + 4 + 4 + 8, "tensor count")
    n_kv = cur.count(8 + 4, "key/value count")
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        start = cur.at
        key = cur.string("a key")
        vtype = cur.unpack("<I")
        value = _value(cur, vtype, key)
        if key in fields:
            raise GGUFFormatError(f"key {key!r} appears twice")
        fields[key] = Field(key, V(vtype), value, bytes(buf[start : cur.at]))
    alignment = DEFAULT_ALIGNMENT
    if ALIGNMENT_KEY in fields:
        alignment = fields[ALIGNMENT_KEY].value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{ALIGNMENT_KEY} {alignment!r} is not a power of two")
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = align(cur.at, alignment)
    tensors: dict[str, TensorRecord] = {}
    for record in infos:
        if record.name in tensors:
            raise GGUFFormatError(f"tensor {record.name!r} appears twice")
        if record.offset % alignment:
            raise GGUFFormatError(f"tensor {record.name!r} is not aligned to {alignment} bytes")
        if data_start + record.offset + record.nbytes > file_size:
            raise GGUFFormatError(
                f"tensor {record.name!r} ends past the end of the file (truncated?)"
            )
        tensors[record.name] = record
    ranges = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos)
    for (_, end, name), (begin, _, after) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise GGUFFormatError(f"tensors {name!r} and {after!r} overlap")
    return Header(version, fields, tensors, alignment, data_start)


def _tensor_info(cur: _Cursor) -> TensorRecord:
    name = cur.string("a tensor name")
    n_dims = cur.unpack("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
    dims = [cur.unpack("<Q") for _ in range(n_dims)]
    qtype = cur.unpack("<I")
    offset = cur.unpack("<Q")
    try:
        kind = GGMLQuantizationType(qtype)
        block, type_size = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"tensor {name!r} has unknown type {qtype}") from None
    if any(d <= 0 for d in dims) or math.prod(dims) >= 2**62:
        raise GGUFFormatError(f"tensor {name!r} has bad dimensions {dims}")
    if dims[0] % block:
        raise GGUFFormatError(
            f"tensor {name!r}: rows of {dims[0]} are not whole {kind.name} blocks"
        )
    nbytes = math.prod(dims) // block * type_size
    return TensorRecord(name, kind, tuple(reversed(dims)), offset, nbytes)


def align(n: int, alignment: int) -> int:
    """n rounded up to a multiple of alignment."""
    return -(-n // alignment) * alignment


def encode_string(text: str) -> bytes:
    """A GGUF string: u64 length, UTF-8 bytes."""
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def encode_field(key: str, vtype: GGUFValueType, value: object) -> bytes:
    """One key/value pair of a scalar or string value."""
    body = encode_string(value) if vtype == V.STRING else struct.pack(_SCALARS[vtype], value)
    return encode_string(key) + struct.pack("<I", int(vtype)) + body


def encode_preamble(version: int, n_tensors: int, n_kv: int) -> bytes:
    """Magic, version and the two counts."""
    return struct.pack("<IIQQ", GGUF_MAGIC, version, n_tensors, n_kv)


def encode_tensor_info(record: TensorRecord) -> bytes:
    """One tensor info (dims innermost first)."""
    dims = tuple(reversed(record.shape))
    return (
        encode_string(record.name)
        + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        + struct.pack("<IQ", int(record.qtype), record.offset)
    )


def tensor_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this type and numpy-order shape."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


# A GGUF file's record holds the digest of the file itself, its own characters read as this
# placeholder (written first, then overwritten once every other byte is in).
DIGEST_PLACEHOLDER = "0" * 64


def file_hash_entry(algorithm: str, digest: str = DIGEST_PLACEHOLDER) -> dict:
    """The record's `file_hash`: the algorithm, and the digest of the file with these
    characters of it read as the placeholder."""
    return {"algorithm": algorithm, "digest": digest}


def digest_offset(head: bytes, algorithm: str, digest: str) -> int | None:
    """Where the record's digest starts in a GGUF header written with `json.dumps(record,
    sort_keys=True)` (the last such entry: the record is the last key written), or None."""
    entry = json.dumps({"file_hash": file_hash_entry(algorithm, digest)}, sort_keys=True)[1:-1]
    at = head.rfind(entry.encode())
    return None if at < 0 else at + len(entry) - len(digest) - 2  # before its closing `"}`
