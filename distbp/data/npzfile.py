"""The ``.npy`` headers inside an ``.npz`` archive, read without reading its arrays.

numpy allocates whatever a header declares before it reads the data behind it, so an archive
whose header claims 1e13 items ends in a MemoryError (or a machine swapping), not in one line
naming the file.  Every reader of an ``.npz`` that comes from outside (``--dataset npz:PATH``,
``distbp convert npz:PATH``, the checkpoint of ``--resume``) reads the headers here first, each
at most ``MAX_HEADER`` bytes, and is refused what no array could be: a header numpy cannot
parse, Python objects (only pickle stores them, and unpickling runs code), or a shape larger
than the bytes the member holds.  What each caller then asks of the arrays (their names, the
memory they need, their row order) is its own.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy

from ..errors import DataError, one_line, size_text

MAX_HEADER = 65536  # bytes of one .npy header; numpy writes ~120, distbp's readers pass this to np.load

# What a damaged or unsupported archive raises from zipfile (and its decompressors) while it is read.
ERRORS = (zlib.error, zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
          NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Member:
    """One ``.npy`` array in the archive, as its header declares it."""

    name: str  # the array's name: the member's file name without ".npy"
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool  # stored in column order
    header: int  # bytes before the data: magic, version, header length and header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_headers(path: str, what: str = "", wanted: Callable[[str], bool] | None = None) -> list[Member]:
    """The ``.npy`` members of the archive ``path`` (those whose name ``wanted`` accepts; other
    members are not read), once each header is readable and its array is one the member holds;
    DataError (one line, starting ``what``, default ``path``) otherwise."""
    what = what or path
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(npy.MAGIC_PREFIX))
    except OSError as exc:
        raise DataError(f"{what}: cannot read file ({exc.strerror or exc})") from None
    if magic == npy.MAGIC_PREFIX:
        raise DataError(f"{what}: a .npy file (one array), not an .npz archive; save the arrays with numpy.savez")
    members = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[:-len(".npy")]
                if not info.filename.endswith(".npy") or (wanted is not None and not wanted(name)):
                    continue  # np.load reads a member only when it is asked for
                with archive.open(info) as fh:
                    members.append(_member(what, name, info, fh))
    except DataError:
        raise
    except ERRORS as exc:
        raise DataError(f"{what}: not a readable .npz file ({one_line(exc)})") from None
    return members


def _member(what: str, name: str, info: zipfile.ZipInfo, fh) -> Member:
    """The header of the member open in ``fh``, read a bounded number of bytes at a time."""
    def unreadable(problem: str) -> DataError:
        return DataError(f"{what}: array {name!r} has an unreadable header ({problem})")

    try:
        version = npy.read_magic(fh)  # ValueError unless the member starts like a .npy array
        if version not in ((1, 0), (2, 0)):  # 3.0 only adds utf-8 field names; numpy has no public reader of it
            raise unreadable(f".npy format {version[0]}.{version[1]}; versions 1.0 and 2.0 are read")
        raw = fh.read(2 if version == (1, 0) else 4)
        length = int.from_bytes(raw, "little")
        if length > MAX_HEADER:
            raise unreadable(f"{length} bytes long; at most {MAX_HEADER} are read")
        text = fh.read(length)
        if len(raw) < (2 if version == (1, 0) else 4) or len(text) < length:
            raise unreadable("the member ends inside it")
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = reader(io.BytesIO(raw + text), max_header_size=MAX_HEADER)
    except DataError:
        raise
    except (ValueError, SyntaxError, TypeError) as exc:  # numpy's parse of the header's text
        raise unreadable(one_line(exc)) from None
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    if any(n < 0 for n in shape):
        raise unreadable(f"negative dimension in shape {shape}")
    if dtype.hasobject:
        raise DataError(f"{what}: not a readable .npz file (array {name!r} holds pickled Python objects, "
                        f"dtype {dtype}; only plain arrays are read)")
    member = Member(name, info, shape, dtype, bool(fortran), npy.MAGIC_LEN + len(raw) + length)
    held = max(0, info.file_size - member.header)
    if member.nbytes > held:
        raise DataError(f"{what}: array {name!r} declares shape {shape} of {dtype} ({size_text(member.nbytes)}) "
                        f"but holds {size_text(held)}: truncated or corrupt")
    return member
