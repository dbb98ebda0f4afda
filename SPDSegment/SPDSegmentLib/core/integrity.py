"""Is an image file complete? Checked before SimpleITK reads it.

ITK's NIfTI reader zero-fills a truncated file (compressed or not) without a word, and its NRRD
reader accepts a gzip stream cut after the last voxel byte, so a damaged download would be
segmented as if it were fine. Here, before reading:

- every gzip stream (``.nii.gz``, gzip-encoded NRRD, compressed MetaImage) is decompressed to its end,
  which checks that it is complete and its CRC (or Adler-32) matches;
- NIfTI-1/2 and uncompressed MetaImage files must hold as many voxel bytes as their header declares.

Only :class:`errors.InputError` leaves this module; a header it does not understand is left to
SimpleITK (which then reads or refuses the file).
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


def check_image_file(path: Path) -> None:
    """InputError if ``path`` is a compressed image whose stream is damaged, or holds fewer voxel bytes
    than its header declares. Folders (DICOM series) are left to SimpleITK."""
    path = Path(path)
    if not path.is_file():
        return
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
    except EOFError as exc:
        raise damaged(path, "its compressed (gzip) stream ends early, the file is truncated") from exc
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError: CRC or length mismatch, bad data
        raise damaged(path, f"its compressed (gzip) stream is corrupt ({exc})") from exc
    return head, total


def _check_nifti(path: Path, header: bytes, total: int) -> None:
    parsed = _nifti_layout(header)
    if parsed is None:
        return  # not a single-file NIfTI header we understand: SimpleITK decides
    offset, voxel_bytes = parsed
    if total < offset + voxel_bytes:
        raise damaged(path, f"its header declares {voxel_bytes} bytes of voxels but the file holds "
                            f"{max(total - offset, 0)}, the file is truncated")


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
    if encoding in ("gzip", "gz"):
        _check_stream(path, data_offset, zlib.decompressobj(47), "gzip")
    elif encoding in ("bzip2", "bz2"):
        _check_stream(path, data_offset, bz2.BZ2Decompressor(), "bzip2")


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
    if fields.get("CompressedData", "False").lower() == "true":
        _check_stream(path, data_offset, zlib.decompressobj(47), "zlib")
        return
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        size = MET_SIZES[fields.get("ElementType", "")]
    except (ValueError, KeyError):
        return
    if not dims or any(d <= 0 for d in dims) or channels <= 0:
        return
    expected = size * channels
    for d in dims:
        expected *= d
    held = path.stat().st_size - data_offset
    if held < expected:
        raise damaged(path, f"its header declares {expected} bytes of voxels but the file holds {max(held, 0)}, "
                            "the file is truncated")


def _check_stream(path: Path, offset: int, decompressor, kind: str) -> None:
    """Decompress the data from ``offset`` to its end; a stream that is cut or corrupt is damage."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while not decompressor.eof:
                block = handle.read(CHUNK)
                if not block:
                    break
                _drain(decompressor, block)
    except (OSError, zlib.error, ValueError, EOFError) as exc:
        raise damaged(path, f"its compressed ({kind}) voxel data is corrupt ({exc})") from exc
    if not decompressor.eof:
        raise damaged(path, f"its compressed ({kind}) voxel data ends early, the file is truncated")


def _drain(decompressor, block: bytes) -> None:
    """Feed ``block``, never holding more than a few MB of output (a small file may inflate enormously)."""
    if isinstance(decompressor, bz2.BZ2Decompressor):
        decompressor.decompress(block, max_length=4 * CHUNK)
        while not decompressor.eof and not decompressor.needs_input:
            decompressor.decompress(b"", max_length=4 * CHUNK)
        return
    data = block
    while data and not decompressor.eof:
        decompressor.decompress(data, 4 * CHUNK)
        data = decompressor.unconsumed_tail
