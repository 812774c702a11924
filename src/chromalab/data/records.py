"""TFRecord files and `tf.train.Example` payloads in plain Python, so nothing here needs TensorFlow.

The framing is TensorFlow's: each record is `uint64 length`, `uint32 masked CRC32C of those 8 bytes`,
`data`, `uint32 masked CRC32C of data` (little-endian). Both checksums are checked on reading, so a flipped
bit or a cut-off file is an error naming the file and the record (counted from 1), never silently bad data.

The payload is a serialised `tf.train.Example` (tensorflow/core/example/{example,feature}.proto), written
and read here with the protobuf wire format directly: three message types of one or two fields each do
not warrant TensorFlow's generated classes, and TensorFlow is what the JAX backend must do without.
CRC32C comes from google-crc32c (Google's C implementation; GB/s, so checking costs little).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

from chromalab.errors import ChromalabError

_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_FOOTER = struct.Struct("<I")  # masked CRC of the data
_MASK_DELTA = 0xA282EAD8
REDO = "re-run the tfrecords stage (`dvc repro -f tfrecords`)"

Feature = bytes | str | Sequence[bytes] | Sequence[int] | Sequence[float] | np.ndarray


# --- framing ------------------------------------------------------------------------------------------------


def masked_crc(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C: rotated and offset so that a CRC of CRC-bearing data is not trivially 0."""
    crc = google_crc32c.value(bytes(data)) if isinstance(data, memoryview) else google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record as it lies in a .tfrecord file."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


class RecordWriter:
    """Appends records to a new file: `with RecordWriter(path) as w: w.write(example_bytes)`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._file: BinaryIO = self.path.open("wb")

    def write(self, data: bytes) -> None:
        self._file.write(frame(data))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_header(f: BinaryIO, path: Path, number: int) -> int | None:
    """The data length of the record at the file position; None at a clean end of file."""
    header = f.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise ChromalabError(f"{path}: record {number} is truncated (the file ends inside its header): {REDO}")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc(header[:8]) != length_crc:
        raise ChromalabError(f"{path}: record {number} is corrupt (its length fails its checksum): {REDO}")
    return length


def _read_body(f: BinaryIO, length: int, path: Path, number: int) -> bytes:
    body = f.read(length + _FOOTER.size)
    if len(body) < length + _FOOTER.size:
        raise ChromalabError(f"{path}: record {number} is truncated (the file ends inside its data): {REDO}")
    data = body[:length]
    if masked_crc(data) != _FOOTER.unpack_from(body, length)[0]:
        raise ChromalabError(f"{path}: record {number} is corrupt (its data fails its checksum): {REDO}")
    return data


def read_records(path: Path | str) -> Iterator[bytes]:
    """Every record's data in file order, both checksums checked."""
    path = Path(path)
    with path.open("rb") as f:
        number = 1
        while (length := _read_header(f, path, number)) is not None:
            yield _read_body(f, length, path, number)
            number += 1


class RecordIndex:
    """Random access to the records of several files, read in the order given: `index.read(i)`.

    Building it reads only the 12-byte headers (checked); each record's data is checked when read.
    """

    def __init__(self, paths: Sequence[Path | str]):
        self.paths = [Path(p) for p in paths]
        self._where: list[tuple[int, int, int, int]] = []  # (file, offset of data, length, number in file)
        for file_index, path in enumerate(self.paths):
            size = path.stat().st_size
            with path.open("rb") as f:
                number = 1
                while (length := _read_header(f, path, number)) is not None:
                    offset = f.tell()
                    if offset + length + _FOOTER.size > size:
                        raise ChromalabError(
                            f"{path}: record {number} is truncated (the file ends inside its data): {REDO}")
                    self._where.append((file_index, offset, length, number))
                    f.seek(length + _FOOTER.size, 1)
                    number += 1
        self._files: dict[int, BinaryIO] = {}

    def __len__(self) -> int:
        return len(self._where)

    def location(self, i: int) -> tuple[Path, int]:
        """(file, record number in it) of record `i`, for messages."""
        file_index, _, _, number = self._where[i]
        return self.paths[file_index], number

    def read(self, i: int) -> bytes:
        file_index, offset, length, number = self._where[i]
        f = self._files.get(file_index)
        if f is None:
            f = self._files[file_index] = self.paths[file_index].open("rb")
        f.seek(offset)
        return _read_body(f, length, self.paths[file_index], number)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# --- tf.train.Example ---------------------------------------------------------------------------------------
# Example{1: Features}; Features{1: repeated map entry {1: key, 2: Feature}};
# Feature{oneof 1: BytesList, 2: FloatList, 3: Int64List}; each list {1: repeated value} (numbers packed).

_BYTES, _FLOATS, _INTS = 1, 2, 3
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _feature(name: str, value: Feature) -> bytes:
    if isinstance(value, (bytes, str)):
        value = [value]
    array = np.asarray(value) if not isinstance(value, np.ndarray) else value
    if array.dtype.kind in "SUO" or (len(value) and isinstance(value[0], (bytes, str))):
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in value]
        kind, body = _BYTES, b"".join(_field(1, item) for item in items)
    elif array.dtype.kind in "iub":
        kind, body = _INTS, _field(1, b"".join(_varint(int(v)) for v in array.ravel()))
    elif array.dtype.kind == "f":
        kind, body = _FLOATS, _field(1, array.astype("<f4").tobytes())
    else:
        raise TypeError(f"feature {name!r}: cannot store {array.dtype} values in a tf.train.Example")
    return _field(1, _field(1, name.encode()) + _field(2, _field(kind, body)))


def encode_example(features: Mapping[str, Feature]) -> bytes:
    """A serialised tf.train.Example: bytes/str → BytesList, integers → Int64List, floats → FloatList."""
    return _field(1, b"".join(_feature(name, value) for name, value in features.items()))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, payload) of each field of one message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, wire, value
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise ValueError("field runs past the end of its message")
            yield number, wire, buf[pos:pos + length]
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if pos + size > end:
                raise ValueError("field runs past the end of its message")
            yield number, wire, buf[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _decode_list(kind: int, buf: memoryview) -> list[bytes] | np.ndarray:
    if kind == _BYTES:
        return [bytes(v) for n, _, v in _fields(buf) if n == 1]
    if kind == _FLOATS:  # packed (as TensorFlow writes) or one fixed32 per value
        parts = [np.frombuffer(v, "<f4") for n, _, v in _fields(buf) if n == 1]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    values: list[int] = []
    for n, wire, v in _fields(buf):
        if n != 1:
            continue
        if wire == _VARINT:
            values.append(v)
        else:
            pos = 0
            while pos < len(v):
                item, pos = _read_varint(v, pos)
                values.append(item)
    return np.array(values, dtype=np.uint64).astype(np.int64)  # two's complement back to signed


def decode_example(data: bytes | memoryview) -> dict[str, list[bytes] | np.ndarray]:
    """A serialised tf.train.Example → {name: list of bytes | int64 array | float32 array}.

    Raises ValueError on malformed data (callers name the file and record).
    """
    features: dict[str, list[bytes] | np.ndarray] = {}
    try:
        for n, _, feats in _fields(memoryview(data)):
            if n != 1:
                continue
            for n2, _, entry in _fields(feats):
                if n2 != 1:
                    continue
                name, value = "", None
                for n3, _, part in _fields(entry):
                    if n3 == 1:
                        name = bytes(part).decode()
                    elif n3 == 2:
                        for kind, _, body in _fields(part):
                            if kind in (_BYTES, _FLOATS, _INTS):
                                value = _decode_list(kind, body)
                features[name] = value if value is not None else []
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a tf.train.Example ({exc})") from None
    return features
