"""A fast check of every image file of a run before its first iteration: the header and the
size, not a decode.

Per file: it exists and can be read; it starts as a JPEG or PNG file does (other formats: Pillow
reads the header); its width and height are positive and within twice Pillow's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, what :func:`~.base.read_image`
refuses); and it is whole: a JPEG ends with its end-of-image marker, a PNG with its ``IEND``
chunk. A truncated download or a half-copied file fails the last test, which is what ends a run
mid-epoch when the sampler finally draws the file. Cost: one read of the file's first 64 KiB
(the whole of a re-ID crop) and, for larger files, of its last bytes; the files are read by a
few threads, since on a network file system the time is spent waiting
(docs/data.md gives the time for Market-1501's 36,036 files).

:func:`check_images` returns the bad files with the reason of each; what a run does with them
(stop, or leave them out) is :mod:`edaan_fast.engine.run_guard`'s.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

__all__ = ["BAD_IMAGES", "check_image", "check_images"]

#: What a run does with the files that fail the check (``--bad-images``).
BAD_IMAGES = ("error", "skip")

_HEAD = 65536
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first start-of-frame segment in ``head``, or ``None``."""
    i, n = 2, len(head)
    while i + 9 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", head[i + 5:i + 9])
            return width, height
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        i += 2 + struct.unpack(">H", head[i + 2:i + 4])[0]
    return None


def _pillow_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:  # the header only
        return img.size


def _size_and_end(path: str, head: bytes, size: int) -> tuple[tuple[int, int] | None, bytes, str]:
    """``(width and height or None, the file's last bytes, format)``."""
    if size <= len(head):
        tail = head[-32:]
    else:
        with open(path, "rb") as f:
            f.seek(-32, os.SEEK_END)
            tail = f.read()
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg_size(head), tail, "JPEG"
    if head.startswith(_PNG) and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24]), tail, "PNG"
    return None, tail, ""


def check_image(path: str) -> str | None:
    """Why the image file at ``path`` would fail to load, as a phrase that follows its path
    (``"is truncated (no JPEG end-of-image marker ...)"``), or ``None`` if it looks whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "is empty (0 bytes)"
        dims, tail, kind = _size_and_end(path, head, size)
        if kind == "JPEG" and b"\xff\xd9" not in tail:
            return f"is truncated (no JPEG end-of-image marker in its last bytes; {size} bytes)"
        if kind == "PNG" and not tail.endswith(_PNG_END):
            return f"is truncated (no PNG IEND chunk at its end; {size} bytes)"
        if dims is None:
            dims = _pillow_size(path)
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else \
            f"is a broken symbolic link (to {os.readlink(path)})"
    except Image.DecompressionBombError as exc:
        return f"is too large to decode ({exc})"
    except OSError as exc:
        if isinstance(exc, Image.UnidentifiedImageError):
            return f"is not an image file (starts with {head[:8]!r})"
        return f"cannot be read ({exc.strerror or exc})"
    except (SyntaxError, ValueError) as exc:
        return f"is not a readable image ({str(exc).splitlines()[0] if str(exc) else exc!r})"
    width, height = dims
    limit = Image.MAX_IMAGE_PIXELS
    if width < 1 or height < 1:
        return f"is not a readable image (its header says {width}x{height} pixels)"
    if limit is not None and width * height > 2 * limit:
        return (f"is too large to decode ({width}x{height} = {width * height} pixels, over "
                f"twice Pillow's decompression-bomb limit of {limit})")
    return None


def _check_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
    return [(p, why) for p in paths if (why := check_image(p)) is not None]


def check_images(paths: Iterable[str], threads: int = 8) -> list[tuple[str, str]]:
    """``(path, reason)`` of every file of ``paths`` that :func:`check_image` finds bad, in the
    order given; each distinct path is checked once."""
    unique = list(dict.fromkeys(map(str, paths)))
    chunks = [unique[i:i + 512] for i in range(0, len(unique), 512)]
    if len(chunks) <= 1 or threads <= 1:
        return _check_chunk(unique)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [bad for part in pool.map(_check_chunk, chunks) for bad in part]
