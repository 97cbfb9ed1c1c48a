"""Images at FIRM's borders: which formats are decoded, the pixel cap, decoding, encoding, data URLs and resizing.

A leaf module (Pillow and numpy; torch only inside the two tensor helpers), used by the shard reader and writer, the
critic server and clients, the critics' image preparation and the policies. Every image that comes from outside
(a shard, a request, a file) is decoded by :func:`decode`: only the whitelisted Pillow plugins ever see the bytes
(never a format that can run code or hide a pickle), and the pixel count is checked from the header before any pixel
is decoded, since a 60 KB PNG can claim 12000 x 12000 pixels (550 MB decoded).
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import torch

# File extensions of images in shards and folders; nothing else is read as an image.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Modes a sample's image may have.
IMAGE_MODES = ("RGB", "RGBA", "L")
# Pillow plugins allowed to read image bytes (MPO: a JPEG with extra frames, as some cameras write).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "MPO")
# Default pixel cap of one decoded image (width x height). Shards hold 512-1024 px images and critics downscale
# anything larger (their image processors cap the pixels they encode), so 4096 x 4096 only refuses the absurd.
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageTooLargeError(ValueError):
    """An image has more pixels than the cap (read from its header, before decoding)."""


class UnsupportedImageError(ValueError):
    """Bytes that are not one of the accepted image formats (PNG, JPEG, WebP)."""


def sniff_format(data: bytes) -> str | None:
    """``PNG``, ``JPEG`` or ``WEBP`` from the magic bytes at the start of ``data``; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS, *, limit_name: str = "max_image_pixels"):
    """A fully loaded PIL image from encoded bytes (PNG, JPEG or WebP).

    Raises:
        UnsupportedImageError: the bytes are not PNG, JPEG or WebP (checked from their magic bytes first, so no other
            plugin of Pillow is ever tried).
        ImageTooLargeError: more than ``max_pixels`` pixels (width x height, from the header); None leaves only
            Pillow's own decompression-bomb limit. ``limit_name`` names the setting in the message.
        OSError / ValueError: corrupt data of an accepted format.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageError(f"the image bytes are not PNG, JPEG or WEBP (they start with {data[:8]!r})")
    with warnings.catch_warnings():
        if max_pixels is not None:  # our cap decides; Pillow's warning would only repeat it, later
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # formats=[fmt]: only the plugin of the sniffed format reads the bytes (Pillow's JPEG plugin gives MPO files)
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
        except Image.DecompressionBombError as e:  # over twice Pillow's own limit: refused while reading the header
            raise ImageTooLargeError(f"{e}; at most {max_pixels} are accepted ({limit_name})") from None
        with im:
            if im.format not in IMAGE_FORMATS:
                raise UnsupportedImageError(f"image format {im.format} is not accepted")
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {im.width}x{im.height} = {im.width * im.height} pixels; at most {max_pixels} are "
                    f"accepted ({limit_name})"
                )
            im.load()
            return im.copy() if im.format == "MPO" else im


# zlib level of the PNGs FIRM writes. Measured on 256 px synthetic scenes (firm.data.bench_read.synthetic_image), one
# core: level 1 encodes in 2.2 ms at 26.7 KB, level 6 in 5.1 ms at 12.6 KB; decoding 0.84 vs 0.62 ms. Shards are
# read more often than written, so the default favours small files; writers that are CPU-bound can pass 1.
PNG_COMPRESS_LEVEL = 6


def encode(
    image: Image.Image, image_format: str = "png", jpeg_quality: int = 95, png_compress_level: int = PNG_COMPRESS_LEVEL
) -> tuple[str, bytes]:
    """``(extension, bytes)`` of an image: PNG (lossless, zlib level ``png_compress_level``) or JPEG."""
    buf = io.BytesIO()
    fmt = image_format.lower()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=int(png_compress_level))
        return "png", buf.getvalue()
    if fmt in ("jpg", "jpeg"):
        if image.mode == "RGBA":
            raise ValueError("JPEG cannot store an alpha channel: write RGBA images as png")
        image.save(buf, format="JPEG", quality=int(jpeg_quality))
        return "jpg", buf.getvalue()
    raise ValueError(f"unknown image_format {image_format!r}: use 'png' (lossless) or 'jpg'")


def fit_pixels(image: Any, max_pixels: int | None = None, what: str = "image") -> Image.Image:
    """An RGB PIL image, downscaled (keeping the aspect ratio, bicubic) to at most ``max_pixels`` pixels.

    Raises:
        TypeError: ``image`` is not a PIL image (``what`` names it in the message).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max_pixels and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def to_data_url(image: Image.Image, fmt: str = "png", quality: int = 95) -> str:
    """A PIL image as a ``data:image/...;base64,...`` URL (PNG as saved by Pillow's defaults, or RGB JPEG)."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "jpeg"
    elif fmt == "png":
        image.save(buf, format="PNG")
        mime = "png"
    else:
        raise ValueError(f"image_format {fmt!r} unknown; use png or jpeg")
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_tensor(images: list[Any], size: int | tuple[int, int]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [0, 1], bicubic resize to ``size`` (an int: square)."""
    import numpy as np
    import torch

    w, h = (size, size) if isinstance(size, int) else size
    arrs = [np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images (rounded to 8 bits)."""
    import torch

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
