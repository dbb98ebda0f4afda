"""Is an image file complete? Checked before SimpleITK reads it.

ITK's NIfTI reader zero-fills a truncated file (compressed or not) without a word, and its NRRD
reader accepts a gzip stream cut after the last voxel byte, so a damaged download would be
segmented as if it were fine. Here, before reading:

- every gzip stream (``.nii.gz``, gzip-encoded NRRD, compressed MetaImage) is decompressed to its end,
  a few MB at a time (never allocating what the header declares), which checks that it is complete and
  its CRC (or Adler-32) matches;
- every format must hold as many voxel bytes as its header declares: NIfTI-1/2 (plain or gzip), NRRD
  (raw, ASCII, gzip, bzip2) and MetaImage (plain or compressed: a complete zlib stream may still hold
  fewer voxels than the header declares, and ITK would fill the rest with zeros).

Only :class:`errors.InputError` leaves :func:`check_image_file`; :func:`find_damage` returns the reason
instead (the read-back of written files uses it). A header it does not understand is left to SimpleITK
(which then reads or refuses the file).
"""
from __future__ import annotations

import bz2
import gzip
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

from .errors import InputError

CHUNK = 1 << 20
NIFTI_HEADER_BYTES = 544  # enough for a NIfTI-2 header
# MetaImage element types -> bytes
MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
             "MET_DOUBLE": 8}
MAX_HEADER_BYTES = 1 << 16  # NRRD / MetaImage text headers are far smaller
# NRRD types -> bytes
NRRD_SIZES = {**{t: 1 for t in ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t")},
              **{t: 2 for t in ("short", "short int", "signed short", "signed short int", "int16", "int16_t",
                                "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t")},
              **{t: 4 for t in ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
                                "uint32_t", "float")},
              **{t: 8 for t in ("longlong", "long long", "long long int", "signed long long",
                                "signed long long int", "int64", "int64_t", "ulonglong", "unsigned long long",
                                "unsigned long long int", "uint64", "uint64_t", "double")}}


class _Damage(Exception):
    """What is wrong with a file (the text after "is damaged: ")."""


def check_image_file(path: Path) -> None:
    """InputError if ``path`` is an image whose compressed stream is damaged, or that holds fewer voxel bytes
    than its header declares. Folders (DICOM series) are left to SimpleITK."""
    what = find_damage(path)
    if what is not None:
        raise damaged(Path(path), what)


def find_damage(path: Path) -> Optional[str]:
    """Why the image file ``path`` is damaged (truncated, corrupt, fewer voxels than declared), or None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        _check(path)
    except _Damage as exc:
        return str(exc)
    return None


def _check(path: Path) -> None:
    with open(path, "rb") as handle:
        start = handle.read(MAX_HEADER_BYTES)
    name = path.name.lower()
    if start[:2] == b"\x1f\x8b":  # a gzip file: .nii.gz and friends
        head, total = _gunzip_all(path)
        if name.endswith((".nii.gz", ".nii")):
            _check_nifti(path, head, total)
        return
    if name.endswith(".nii"):
        _check_nifti(path, start, path.stat().st_size)
    elif start.startswith(b"NRRD000"):
        _check_nrrd(path, start)
    elif name.endswith(".mha"):
        _check_metaimage(path, start)


def damaged(path: Path, what: str) -> InputError:
    return InputError(f"Image {path} is damaged: {what}. Copy or download it again (it may have been cut off "
                      "during a transfer); nothing was segmented.")


def _too_short(declared: int, held: int, unit: str = "bytes of voxels") -> _Damage:
    return _Damage(f"its header declares {declared} {unit} but the file holds {max(held, 0)}, the file is truncated "
                   "or its header is wrong")


def _gunzip_all(path: Path) -> Tuple[bytes, int]:
    """(first bytes, total decompressed size) of a gzip file, reading it to the end (checks length and CRC)."""
    head, total = b"", 0
    try:
        with gzip.open(path, "rb") as stream:
            while True:
                block = stream.read(CHUNK)
                if not block:
                    break
                if len(head) < NIFTI_HEADER_BYTES:
                    head += block[: NIFTI_HEADER_BYTES - len(head)]
                total += len(block)
    except EOFError:
        raise _Damage("its compressed (gzip) stream ends early, the file is truncated") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError: CRC or length mismatch, bad data
        raise _Damage(f"its compressed (gzip) stream is corrupt ({exc})") from None
    return head, total


def _check_nifti(path: Path, header: bytes, total: int) -> None:
    parsed = _nifti_layout(header)
    if parsed is None:
        return  # not a single-file NIfTI header we understand: SimpleITK decides
    offset, voxel_bytes = parsed
    if total < offset + voxel_bytes:
        raise _too_short(voxel_bytes, total - offset)


def _nifti_layout(header: bytes) -> Optional[Tuple[int, int]]:
    """(voxel offset, voxel bytes) of a single-file NIfTI-1 or NIfTI-2 header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:347] != b"n+1":
                return None  # a .hdr/.img pair or not NIfTI
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = struct.unpack(endian + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if header[4:7] != b"n+2":
                return None
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8 or not 0 <= offset < 2 ** 62:  # NaN fails too
        return None
    sizes = dims[1:ndim + 1]
    if any(s <= 0 for s in sizes):
        return None
    count = 1
    for s in sizes:
        count *= int(s)
    return int(offset), count * (bitpix // 8)


def _text_header(start: bytes, end_marker: bytes) -> Optional[Tuple[str, int]]:
    """(header text, offset of the data) for a text header ending at ``end_marker``, or None."""
    index = start.find(end_marker)
    if index < 0:
        return None
    try:
        return start[:index].decode("latin-1"), index + len(end_marker)
    except UnicodeDecodeError:
        return None


def _check_nrrd(path: Path, start: bytes) -> None:
    parsed = _text_header(start, b"\n\n") or _text_header(start, b"\r\n\r\n")
    if parsed is None:
        return
    text, data_offset = parsed
    fields = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    if "data file" in fields or "datafile" in fields:
        return  # detached data: SimpleITK reads and checks it
    encoding = fields.get("encoding", "raw").lower()
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        item = NRRD_SIZES.get(fields.get("type", "").lower())
        skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        lines_skipped = int(fields.get("line skip", fields.get("lineskip", "0")))
    except ValueError:
        return
    count = _product(sizes) if sizes and all(s > 0 for s in sizes) else None
    if lines_skipped or skip < 0:
        count = None  # rare layouts: only the streams are checked
    if encoding in ("gzip", "gz"):
        held = _check_stream(path, data_offset, zlib.decompressobj(47), "gzip")
    elif encoding in ("bzip2", "bz2"):
        held = _check_stream(path, data_offset, bz2.BZ2Decompressor(), "bzip2")
    elif encoding in ("ascii", "text", "txt"):
        if count is not None:
            values = _count_values(path, data_offset, count)
            if values < count:
                raise _too_short(count, values, "voxel values")
        return
    elif encoding == "raw":
        held = path.stat().st_size - data_offset
    else:
        return  # hex and future encodings: SimpleITK decides
    if count is not None and item is not None and held - skip < count * item:
        raise _too_short(count * item, held - skip)


def _product(values) -> int:
    count = 1
    for v in values:
        count *= int(v)
    return count


def _count_values(path: Path, offset: int, enough: int) -> int:
    """Whitespace-separated values of an ASCII payload from ``offset``, counted up to ``enough``."""
    count, tail = 0, b""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while count < enough:
            block = handle.read(CHUNK)
            if not block:
                return count + (1 if tail.strip() else 0)
            block = tail + block
            words = block.split()
            ends_inside = not block[-1:].isspace()
            tail = words.pop() if ends_inside and words else b""  # a number cut by the block boundary
            count += len(words)
    return count


def _check_metaimage(path: Path, start: bytes) -> None:
    marker = start.find(b"ElementDataFile")
    if marker < 0:
        return
    line_end = start.find(b"\n", marker)
    if line_end < 0:
        return
    text = start[:line_end].decode("latin-1", errors="replace")
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if fields.get("ElementDataFile", "").upper() != "LOCAL":
        return
    data_offset = line_end + 1
    expected = None
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        size = MET_SIZES[fields.get("ElementType", "")]
        if dims and all(d > 0 for d in dims) and channels > 0:
            expected = size * channels * _product(dims)
    except (ValueError, KeyError):
        pass
    if fields.get("CompressedData", "False").lower() == "true":
        held = _check_stream(path, data_offset, zlib.decompressobj(47), "zlib")
    else:
        held = path.stat().st_size - data_offset
    if expected is not None and held < expected:
        raise _too_short(expected, held)


def _check_stream(path: Path, offset: int, decompressor, kind: str) -> int:
    """Decompress the data from ``offset`` to its end (a cut or corrupt stream is damage); its size in bytes."""
    total = 0
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while not decompressor.eof:
                block = handle.read(CHUNK)
                if not block:
                    break
                total += _drain(decompressor, block)
    except (OSError, zlib.error, ValueError, EOFError) as exc:
        raise _Damage(f"its compressed ({kind}) voxel data is corrupt ({exc})") from None
    if not decompressor.eof:
        raise _Damage(f"its compressed ({kind}) voxel data ends early, the file is truncated")
    return total


def _drain(decompressor, block: bytes) -> int:
    """Feed ``block``, never holding more than a few MB of output (a small file may inflate enormously);
    the number of bytes it decompressed to."""
    if isinstance(decompressor, bz2.BZ2Decompressor):
        total = len(decompressor.decompress(block, max_length=4 * CHUNK))
        while not decompressor.eof and not decompressor.needs_input:
            total += len(decompressor.decompress(b"", max_length=4 * CHUNK))
        return total
    total = 0
    data = block
    while data and not decompressor.eof:
        total += len(decompressor.decompress(data, 4 * CHUNK))
        data = decompressor.unconsumed_tail
    return total
