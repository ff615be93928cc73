"""Token files, memory-mapped: a 1-D array of token ids in a raw ``.bin`` file (of a given dtype),
an ``.npy`` file or an array of an ``.npz`` archive, and UTF-8 text read a character a token.

Nothing is read whole into memory. A ``.bin`` or ``.npy`` file, or an array stored uncompressed
in an ``.npz`` archive (``np.savez``), is mapped where it lies; a compressed array
(``np.savez_compressed``) and a text file are first written, a block at a time, to a temporary
token file, removed as soon as it is mapped (the mapping keeps it). Pages of the mapping that a batch read
are given back to the kernel after it (`TokenFile.release`), so that the process's resident
memory stays flat however much of a large file the windows visit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

import engine

IDS = (".bin", ".npy", ".npz")  # files of token ids; any other is text (tokenizer = "char")
BLOCK = 1 << 22  # tokens, or characters, read or written at a time: 4 Mi
PAGE = mmap.PAGESIZE


class TokenFile:
    """A 1-D array of token ids mapped from a file (`array`). A `temporary` file is removed once
    mapped: the mapping keeps its pages, and nothing is left behind however the process ends."""

    def __init__(self, path: Path, dtype: np.dtype, offset: int, count: int, temporary: bool = False) -> None:
        self.path = path
        with open(path, "rb") as handle:
            # A zero-length file cannot be mapped; one of fewer than two tokens has no window anyway.
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if count else None
        if temporary:
            path.unlink()
        self.offset, self.itemsize = offset, np.dtype(dtype).itemsize
        buffer = self.map if self.map is not None else b""
        self.array = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset if count else 0)

    def __len__(self) -> int:
        return len(self.array)

    def release(self, starts: Sequence[int], length: int) -> None:
        """Give back the pages of the windows of `length` tokens at `starts`: they stay in the page
        cache, out of this process's resident memory (a file mapping's pages count in it once read)."""
        if self.map is None or not hasattr(self.map, "madvise"):
            return
        size = len(self.map)
        for start in starts:
            low = (self.offset + int(start) * self.itemsize) // PAGE * PAGE
            high = min(size, self.offset + (int(start) + length) * self.itemsize)
            self.map.madvise(mmap.MADV_DONTNEED, low, high - low)

    def close(self) -> None:
        self.array = np.empty(0, dtype=self.array.dtype)  # the mapping cannot close while viewed
        if self.map is not None:
            with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped when it goes
                self.map.close()


def open_ids(path: Path, dtype: str, key: str, where: str) -> TokenFile:
    """The token ids of a ``.bin``, ``.npy`` or ``.npz`` file, mapped; a ConfigError naming `where`
    (``data.path``) when it is not a 1-D array of integers."""
    try:
        if path.suffix == ".bin":
            itemsize = np.dtype(dtype).itemsize
            size = path.stat().st_size
            if size % itemsize:
                raise engine.ConfigError(
                    f"{where}: '{path}' has {size} bytes, not a whole number of {dtype} token ids (data.dtype)"
                )
            return checked(TokenFile(path, np.dtype(dtype), 0, size // itemsize), path, where)
        if path.suffix == ".npy":
            with open(path, "rb") as handle:
                shape, found, offset = npy_header(handle)
            return checked(TokenFile(path, found, offset, shape_count(shape, path, where)), path, where)
        return checked(npz_member(path, key, where), path, where)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise engine.ConfigError(f"{where}: '{path}' cannot be read as token ids: {engine.one_line(error)}") from None


def npy_header(handle) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and data offset of the ``.npy`` stream at `handle`'s position."""
    version = np.lib.format.read_magic(handle)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(handle)  # a 1-D array is the same in either order
    return shape, dtype, handle.tell()


def shape_count(shape: tuple[int, ...], path: Path, where: str) -> int:
    if len(shape) != 1:
        raise engine.ConfigError(f"{where}: '{path}' holds an array of shape {shape}, not a 1-D array of token ids")
    return shape[0]


def npz_member(path: Path, key: str, where: str) -> TokenFile:
    """Array `key` of an ``.npz`` archive (its only one when `key` is empty): mapped in place when
    stored uncompressed, else decompressed a block at a time into a temporary file."""
    with zipfile.ZipFile(path) as archive:
        names = [name.removesuffix(".npy") for name in archive.namelist()]
        chosen = key or (names[0] if len(names) == 1 else "")
        if chosen not in names:
            wanted = f"has no array {key!r}" if key else f"holds {len(names)} arrays: name one with data.key"
            raise engine.ConfigError(f"{where}: '{path}' {wanted} (it has: {', '.join(names)})")
        info = archive.getinfo(chosen + ".npy")
        with archive.open(info) as member:
            shape, dtype, header = npy_header(member)
            count = shape_count(shape, path, where)
            if info.compress_type == zipfile.ZIP_STORED:
                return TokenFile(path, dtype, data_offset(path, info) + header, count)
            return TokenFile(spooled(member, dtype, count), dtype, 0, count, temporary=True)


def data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes begin in its archive: after its local header (30 bytes, then
    its name and an extra field whose lengths the header gives)."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(handle.read(4), dtype="<u2")
    return info.header_offset + 30 + int(name_length) + int(extra_length)


def spooled(stream, dtype: np.dtype, count: int) -> Path:
    """`count` values of `dtype` from `stream`, written a block at a time to a temporary file."""
    path = temporary_file()
    left = count * dtype.itemsize
    with open(path, "wb") as out:
        while left:
            block = stream.read(min(left, BLOCK * dtype.itemsize))
            if not block:
                raise ValueError("the array ends early")
            out.write(block)
            left -= len(block)
    return path


def checked(tokens: TokenFile, path: Path, where: str) -> TokenFile:
    if tokens.array.dtype.kind not in "iu":
        tokens.close()
        raise engine.ConfigError(f"{where}: '{path}' holds {tokens.array.dtype} values, not integer token ids")
    return tokens


def largest(tokens: TokenFile) -> int:
    """The largest token id, read a block at a time (its pages given back after each); negative
    ids are refused."""
    high, low = -1, 0
    for start in range(0, len(tokens), BLOCK):
        block = tokens.array[start : start + BLOCK]
        high, low = max(high, int(block.max())), min(low, int(block.min()))
        tokens.release([start], len(block))
    if low < 0:
        raise engine.ConfigError(f"data: '{tokens.path}' holds a negative token id ({low})")
    return high


# --- text, a character a token ------------------------------------------------------------------


def text_blocks(path: Path) -> Iterator[str]:
    """The characters of a UTF-8 text file, a block at a time (universal newlines, as Python reads text)."""
    try:
        with open(path, encoding="utf-8") as handle:
            while block := handle.read(BLOCK):
                yield block
    except UnicodeDecodeError as error:
        raise engine.ConfigError(f"data: '{path}' is not UTF-8 text: {engine.one_line(error)}") from None


def characters(paths: Sequence[Path]) -> tuple[str, ...]:
    """The vocabulary of the text files: every character they hold, sorted."""
    found: set[str] = set()
    for path in paths:
        for block in text_blocks(path):
            found.update(block)
    return tuple(sorted(found))


def encoded(path: Path, vocabulary: Sequence[str], where: str) -> TokenFile:
    """A text file as token ids (each character's place in `vocabulary`), written a block at a time
    to a temporary file and mapped; a character outside the vocabulary is a ConfigError."""
    codes = np.array([ord(character) for character in vocabulary], dtype=np.uint32)
    order = np.argsort(codes)  # searched in code order; an id is the character's place in `vocabulary`
    codes = codes[order]
    dtype = np.dtype(np.uint8 if len(vocabulary) <= 256 else np.uint16 if len(vocabulary) <= 65536 else np.uint32)
    target, count = temporary_file(), 0
    try:
        with open(target, "wb") as out:
            for block in text_blocks(path):
                points = np.frombuffer(block.encode("utf-32-le"), dtype=np.uint32)
                places = np.searchsorted(codes, points).clip(max=len(codes) - 1)
                unknown = codes[places] != points
                if unknown.any():
                    character = chr(int(points[unknown][0]))
                    raise engine.ConfigError(
                        f"{where}: '{path}' holds the character {character!r}, which the vocabulary does not "
                        f"({len(vocabulary)} characters, the training text's)"
                    )
                out.write(order[places].astype(dtype).tobytes())
                count += len(points)
    except BaseException:
        target.unlink()
        raise
    return TokenFile(target, dtype, 0, count, temporary=True)


def temporary_file() -> Path:
    """A new temporary file's path (in $TMPDIR), for a token file the run maps and then removes."""
    handle, name = tempfile.mkstemp(prefix="engine-tokens-", suffix=".bin")
    os.close(handle)
    return Path(name)
