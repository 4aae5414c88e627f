"""Image loading for `image_url` content parts: URL -> RGB `PIL.Image`.

`data:` URLs with base64 payloads are always accepted. http(s) URLs and local files
are read by `server.api.media` when the server's settings allow them. The byte limit
applies to every source, and the pixel limit is checked from the image header, before
any pixel is decoded. Every image comes out in
RGB with its EXIF orientation applied: alpha is composited on white, and 16-bit and
float greyscale are scaled to 8 bits rather than clipped.

Runs in a worker thread (PIL decoding is blocking CPU work); errors are APIErrors that
name the content part.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.api.errors import APIError
from server.api.media import MediaPolicy, fetch_http_image, read_local_image, too_large

# Formats Pillow may open. A fixed list keeps other plugins (EPS runs Ghostscript)
# away from untrusted bytes. JPEG includes MPO files from phone cameras.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_WHITESPACE = re.compile(r"\s+")

# Errors Pillow raises on truncated or corrupt data. UnidentifiedImageError is an OSError
# too, so it is caught before these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def load_image(url: str, param: str, max_pixels: int, policy: MediaPolicy) -> Image.Image:
    """Read and decode the image of a content part's `image_url.url` into an RGB image.

    `param` names the part in error messages, e.g. `messages[0].content[1].image_url`.
    Raises a 413 APIError when the file is over `policy.max_image_bytes` or width *
    height is over `max_pixels`, else a 400 APIError for URLs that the policy rejects
    and for data that is not a complete image.
    """
    data = read_image_bytes(url, param, policy)
    image = open_image(data, param, max_pixels)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except _DECODE_ERRORS as exc:
        raise APIError(
            400,
            f"'{param}' contains a truncated or corrupt {image.format} image ({exc}). Send the complete file.",
            param=param,
            code="invalid_image",
        ) from exc


def read_image_bytes(url: str, param: str, policy: MediaPolicy) -> bytes:
    """Return the image file's bytes from a data URL, an http(s) URL, or a local path or file URL."""
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        return decode_data_url(url, param, policy.max_image_bytes)
    if scheme.startswith(("http://", "https://")):
        return fetch_http_image(url, param, policy)
    if _RAW_BASE64.fullmatch(url[:4096]):
        # Base64 of a JPEG starts with "/9j/", which would otherwise read as a local path.
        raise _invalid_url(param, "The URL looks like base64 image data without the data: prefix")
    if scheme.startswith("file:") or url.startswith("/"):
        return read_local_image(url, param, policy)
    raise _invalid_url(param, "The URL is not a data:, http(s) or file: URL, nor an absolute path")


# Long runs of the base64 alphabet only: no dot, so no file name with an extension.
_RAW_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{64,}")


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """Return the bytes of a base64 `data:` URL, or raise a 400 APIError for any other URL.

    Raises a 413 APIError when the decoded data would be over `max_bytes`, before decoding.
    """
    if not url[:5].lower().startswith("data:"):
        raise _invalid_url(param, "The URL is not a data: URL")

    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _invalid_url(param, "The data URL has no ',' before its data")
    media_type, *attributes = [item.strip().lower() for item in header.split(";")]
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise _invalid_url(param, f"The data URL has media type '{media_type}', not an image type")
    if "base64" not in attributes:
        raise _invalid_url(param, "The data URL is not base64-encoded")

    payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise _invalid_url(param, "The data URL has no data")
    decoded_size = len(payload) * 3 // 4 - len(payload) + len(payload.rstrip("="))
    if decoded_size > max_bytes:
        raise too_large(param, f"{decoded_size} bytes", max_bytes)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(
            400,
            f"'{param}' has invalid base64 data ({exc}). Encode the image file with standard base64.",
            param=param,
            code="invalid_image",
        ) from exc


def _invalid_url(param: str, reason: str) -> APIError:
    return APIError(
        400,
        f"Invalid '{param}': {reason}. Send the image inline as a data URL: data:image/png;base64,<data>.",
        param=param,
        code="invalid_image_url",
    )


def open_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Open an image lazily, reading only its header, and check its size against `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise APIError(
            413,
            f"'{param}' is too large to decode: {exc} Pillow rejects images of this size "
            "whatever --max-image-pixels is set to. Resize the image.",
            param=param,
            code="image_too_large",
        ) from exc
    except UnidentifiedImageError as exc:
        raise APIError(
            400,
            f"'{param}' is not an image in a supported format ({', '.join(SUPPORTED_FORMATS)}).",
            param=param,
            code="invalid_image",
        ) from exc
    except _DECODE_ERRORS as exc:
        raise APIError(
            400,
            f"'{param}' has a corrupt image header ({exc}). Send the complete file.",
            param=param,
            code="invalid_image",
        ) from exc

    width, height = image.size
    if width * height > max_pixels:
        raise APIError(
            413,
            f"'{param}' is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels. "
            "Resize the image or raise --max-image-pixels (SPECVLM_MAX_IMAGE_PIXELS) on the server.",
            param=param,
            code="image_too_large",
        )
    if width == 0 or height == 0:
        raise APIError(400, f"'{param}' has no pixels ({width}x{height}).", param=param, code="invalid_image")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB.

    A transparency key in `image.info` (PNG tRNS of a palette, grey or RGB image) counts
    as alpha, so RGB images with one are composited too.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float greyscale to 8 bits, where Pillow's own convert clips.

    NOTE: integer mode "I" is read as 16-bit data when its values fit in 0..65535, and
    float mode "F" as 0..1 or 0..255 when the values fit. Other ranges are stretched
    from their minimum to their maximum, because the file does not record its range.
    """
    values = np.asarray(image, dtype=np.float32)  # [height, width]
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())

    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode == "F" and low >= 0 and high <= 255.0:
        scaled = values
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)

    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
