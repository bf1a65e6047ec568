"""An image file's declared size, read from its header before anything is decoded.

A small file can declare a huge image (a 389 KB PNG of 20000 x 20000 pixels decodes to 1.2 GB of
RGB, and the decoder needs several times that): like Pillow's ``Image.MAX_IMAGE_PIXELS``, every
image this project decodes (``convmixer_tf.predict``, training and evaluation) is refused above
:data:`MAX_IMAGE_PIXELS` pixels, read from the header of JPEG, PNG, GIF, BMP and WebP files.

The limit is Pillow's default (89,478,485 pixels, about 0.25 GB of RGB); the environment
variable ``CONVMIXER_MAX_IMAGE_PIXELS`` changes it for files you trust.

Example:
    >>> import io, struct
    >>> png = b"\\x89PNG\\r\\n\\x1a\\n" + b"\\0\\0\\0\\rIHDR" + struct.pack(">II", 20000, 20000)
    >>> declared_size(io.BytesIO(png))
    (20000, 20000)
    >>> too_many_pixels(io.BytesIO(png))
    '400000000 pixels (20000 x 20000), above the limit of 89478485 (CONVMIXER_MAX_IMAGE_PIXELS)'
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS
LIMIT_VARIABLE = "CONVMIXER_MAX_IMAGE_PIXELS"
# A JPEG's frame header (SOF) follows its metadata segments; give up looking after this many
# bytes (the decoder then decides).
_JPEG_SCAN_BYTES = 4 * 1024 * 1024
# SOF markers: baseline, extended, progressive, lossless, ... (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def max_image_pixels() -> int:
    """The pixel limit: ``$CONVMIXER_MAX_IMAGE_PIXELS`` if set, else :data:`MAX_IMAGE_PIXELS`."""
    value = os.environ.get(LIMIT_VARIABLE)
    if value is None:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{LIMIT_VARIABLE} must be a positive integer. Received: {value!r}")
    return limit


def declared_size(f: BinaryIO) -> tuple[int, int] | None:
    """``(width, height)`` from the header of an open image file, or None if the format is not
    recognized or the header is cut short. Reads from the start; leaves the position anywhere."""
    f.seek(0)
    head = f.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head.startswith(b"BM") and len(head) >= 26:
        header_size = struct.unpack("<I", head[14:18])[0]
        if header_size == 12:  # BITMAPCOREHEADER
            return struct.unpack("<HH", head[18:22])
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)  # a negative height means top-down rows
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(f)
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = struct.unpack("<I", head[21:25])[0]
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    """Walks the JPEG's segments to its frame header (SOF), which holds the size."""
    f.seek(2)
    while f.tell() < _JPEG_SCAN_BYTES:
        byte = f.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue  # not at a marker (entropy-coded data): keep looking
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD9 or code == 0x00:
            continue  # markers without a length
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if code in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        f.seek(length - 2, os.SEEK_CUR)
    return None


def too_many_pixels(f: BinaryIO) -> str | None:
    """Why the open image file is refused (its declared size is above the limit), or None."""
    size = declared_size(f)
    limit = max_image_pixels()
    if size is None or size[0] * size[1] <= limit:
        return None
    return (
        f"{size[0] * size[1]} pixels ({size[0]} x {size[1]}), above the limit of {limit} "
        f"({LIMIT_VARIABLE})"
    )
