"""Minimal reader for Qt binary resource files (``.rcc``), enough to list and extract files.

Format (Qt's ``rcc``, versions 1-3): a 20/24-byte header ``b"qres"``, version, tree offset,
data offset, names offset[, flags]; a tree of 14-byte (v1) or 22-byte (v2+) nodes; names are
UTF-16BE with a length and a hash; file payloads are a 4-byte size then the bytes, compressed
with zlib (``qCompress``: 4-byte big-endian length + zlib stream) or zstd when the node says so.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import PurePosixPath
from typing import Iterator

_COMPRESSED = 0x01
_DIRECTORY = 0x02
_COMPRESSED_ZSTD = 0x04


def _zstd_decompress(payload: bytes) -> bytes:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - build-time only
        raise RuntimeError("this .rcc entry is zstd-compressed: pip install zstandard") from exc
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 28)


class RccFile:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.buf = f.read()
        if self.buf[:4] != b"qres":
            raise ValueError(f"{path}: not a Qt resource file (missing 'qres' magic)")
        self.version, self.tree, self.data, self.names = struct.unpack(">IIII", self.buf[4:20])
        self.node_size = 14 if self.version == 1 else 22

    def _name(self, offset: int) -> str:
        pos = self.names + offset
        (length,) = struct.unpack(">H", self.buf[pos : pos + 2])
        pos += 6  # length + hash
        return self.buf[pos : pos + 2 * length].decode("utf-16-be")

    def _node(self, index: int):
        pos = self.tree + index * self.node_size
        name_off, flags = struct.unpack(">IH", self.buf[pos : pos + 6])
        if flags & _DIRECTORY:
            count, first = struct.unpack(">II", self.buf[pos + 6 : pos + 14])
            return name_off, flags, count, first
        (data_off,) = struct.unpack(">I", self.buf[pos + 10 : pos + 14])
        return name_off, flags, None, data_off

    def _payload(self, flags: int, data_off: int) -> bytes:
        pos = self.data + data_off
        (size,) = struct.unpack(">I", self.buf[pos : pos + 4])
        raw = self.buf[pos + 4 : pos + 4 + size]
        if flags & _COMPRESSED_ZSTD:
            return _zstd_decompress(raw)
        if flags & _COMPRESSED:
            return zlib.decompress(raw[4:])
        return raw

    def files(self) -> Iterator[tuple[str, bytes]]:
        """Yield ``(path, bytes)`` for every file in the resource tree."""
        stack = [(0, PurePosixPath(""))]
        while stack:
            index, parent = stack.pop()
            name_off, flags, count, other = self._node(index)
            name = "" if index == 0 else self._name(name_off)
            path = parent / name if name else parent
            if count is not None:
                for child in range(other, other + count):
                    stack.append((child, path))
            else:
                yield str(path), self._payload(flags, other)
