"""Image loading tests: formats, modes, orientation, limits and broken data, built with PIL."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from server.api.errors import APIError
from server.api.images import decode_data_url, load_image
from server.api.media import MediaPolicy

PARAM = "messages[0].content[1].image_url"
MAX_PIXELS = 512 * 512
MAX_BYTES = 1024 * 1024
POLICY = MediaPolicy(max_image_bytes=MAX_BYTES)
RED = (255, 0, 0)
WHITE = (255, 255, 255)


def load(url: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    return load_image(url, PARAM, max_pixels, POLICY)


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    assert len(pixel) == 3
    for got, want in zip(pixel, expected):
        assert abs(got - want) <= tolerance, f"pixel {pixel}, expected about {expected}"


def half_red_half_blue(width: int = 40, height: int = 20) -> Image.Image:
    image = Image.new("RGB", (width, height), RED)
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


# Formats


@pytest.mark.parametrize(
    ("image_format", "options"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 95}),
        ("WEBP", {"lossless": True}),
        ("WEBP", {"quality": 90}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
    ],
)
def test_format_loads_to_rgb(make_data_url: Callable[..., str], image_format: str, options: dict) -> None:
    image = load(make_data_url(half_red_half_blue(), image_format, **options))

    assert image.mode == "RGB"
    assert image.size == (40, 20)
    assert_close(image.getpixel((5, 10)), RED)
    assert_close(image.getpixel((35, 10)), (0, 0, 255))


def test_gif_first_frame_is_used(make_data_url: Callable[..., str]) -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    url = "data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode()

    image = load(url)

    assert image.size == (16, 16)
    assert_close(image.getpixel((8, 8)), RED)


# Modes


def test_cmyk_jpeg_converts(make_data_url: Callable[..., str]) -> None:
    cmyk_red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))

    image = load(make_data_url(cmyk_red, "JPEG", quality=95))

    assert image.mode == "RGB"
    assert_close(image.getpixel((8, 8)), RED)


def test_cmyk_tiff_converts(make_data_url: Callable[..., str]) -> None:
    image = load(make_data_url(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF"))

    assert_close(image.getpixel((8, 8)), RED, tolerance=0)


@pytest.mark.parametrize("image_format", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(make_data_url: Callable[..., str], image_format: str) -> None:
    palette_image = Image.new("P", (16, 8), 0)
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette_image.paste(1, (8, 0, 16, 8))  # right half: index 1, the transparent one

    image = load(make_data_url(palette_image, image_format, transparency=1))

    assert image.mode == "RGB"
    assert_close(image.getpixel((2, 4)), RED, tolerance=0)
    assert_close(image.getpixel((12, 4)), WHITE, tolerance=0)


def test_la_alpha_composited_on_white(make_data_url: Callable[..., str]) -> None:
    half_transparent_black = Image.new("LA", (8, 8), (0, 128))

    image = load(make_data_url(half_transparent_black, "PNG"))

    assert image.mode == "RGB"
    assert_close(image.getpixel((4, 4)), (127, 127, 127), tolerance=2)


@pytest.mark.parametrize(("image_format", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_rgba_alpha_composited_on_white(make_data_url: Callable[..., str], image_format: str, options: dict) -> None:
    rgba = Image.new("RGBA", (16, 8), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (8, 0, 16, 8))  # right half fully transparent blue

    image = load(make_data_url(rgba, image_format, **options))

    assert_close(image.getpixel((2, 4)), RED, tolerance=0)
    assert_close(image.getpixel((12, 4)), WHITE, tolerance=0)


def test_rgb_png_with_transparent_colour_key(make_data_url: Callable[..., str]) -> None:
    rgb = Image.new("RGB", (16, 8), RED)
    rgb.paste((0, 255, 0), (8, 0, 16, 8))

    image = load(make_data_url(rgb, "PNG", transparency=(0, 255, 0)))

    assert_close(image.getpixel((2, 4)), RED, tolerance=0)
    assert_close(image.getpixel((12, 4)), WHITE, tolerance=0)


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_16_bit_grey_mid_value_stays_mid_grey(make_data_url: Callable[..., str], image_format: str) -> None:
    grey16 = Image.fromarray(np.full((6, 10), 32768, dtype=np.uint16))
    assert grey16.mode == "I;16"

    image = load(make_data_url(grey16, image_format))

    assert image.mode == "RGB"
    assert image.size == (10, 6)
    assert_close(image.getpixel((5, 3)), (128, 128, 128), tolerance=1)


def test_16_bit_gradient_keeps_order(make_data_url: Callable[..., str]) -> None:
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))

    image = load(make_data_url(Image.fromarray(ramp), "PNG"))

    row = [image.getpixel((x, 0))[0] for x in range(16)]
    assert row[0] == 0
    assert row[-1] == 255
    assert row == sorted(row)


def test_32_bit_integer_tiff_scaled(make_data_url: Callable[..., str]) -> None:
    int32 = Image.fromarray(np.full((4, 4), 32768, dtype=np.int32))
    assert int32.mode == "I"

    image = load(make_data_url(int32, "TIFF"))

    assert_close(image.getpixel((1, 1)), (128, 128, 128), tolerance=1)


@pytest.mark.parametrize(("value", "expected"), [(0.5, 128), (200.0, 200)])
def test_float_tiff_scaled(make_data_url: Callable[..., str], value: float, expected: int) -> None:
    float_image = Image.fromarray(np.full((4, 4), value, dtype=np.float32))
    assert float_image.mode == "F"

    image = load(make_data_url(float_image, "TIFF"))

    assert_close(image.getpixel((1, 1)), (expected, expected, expected), tolerance=1)


def test_float_tiff_outside_known_ranges_stretched(make_data_url: Callable[..., str]) -> None:
    values = np.array([[-10.0, 0.0, 1000.0]], dtype=np.float32)

    image = load(make_data_url(Image.fromarray(values), "TIFF"))

    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 3, 255]  # 10 / 1010 * 255 = 2.5


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "TIFF"])
def test_one_bit_image_converts(make_data_url: Callable[..., str], image_format: str) -> None:
    bilevel = Image.new("1", (16, 8), 0)
    bilevel.paste(1, (8, 0, 16, 8))

    image = load(make_data_url(bilevel, image_format))

    assert image.mode == "RGB"
    assert image.getpixel((2, 4)) == (0, 0, 0)
    assert image.getpixel((12, 4)) == WHITE


def test_grey_jpeg_converts(make_data_url: Callable[..., str]) -> None:
    image = load(make_data_url(Image.new("L", (8, 8), 100), "JPEG"))

    assert image.mode == "RGB"
    assert_close(image.getpixel((4, 4)), (100, 100, 100), tolerance=2)


# Orientation


def test_exif_orientation_rotates(make_data_url: Callable[..., str]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; display after a 90 degree clockwise turn

    image = load(make_data_url(half_red_half_blue(40, 20), "JPEG", quality=95, exif=exif))

    assert image.size == (20, 40)
    assert_close(image.getpixel((10, 5)), RED)  # the stored left half is now on top
    assert_close(image.getpixel((10, 35)), (0, 0, 255))


# Data URL forms


def test_data_url_without_media_type_accepted(make_data_url: Callable[..., str]) -> None:
    payload = make_data_url(Image.new("RGB", (4, 4)), "PNG").split(",", 1)[1]

    assert load("data:;base64," + payload).size == (4, 4)
    assert load("data:application/octet-stream;base64," + payload).size == (4, 4)


def test_media_type_need_not_match_bytes(make_data_url: Callable[..., str]) -> None:
    payload = make_data_url(Image.new("RGB", (4, 4)), "PNG").split(",", 1)[1]

    assert load("data:image/jpeg;base64," + payload).size == (4, 4)


def test_base64_with_line_breaks_and_no_padding() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3)).save(buffer, format="PNG")
    encoded = base64.encodebytes(buffer.getvalue()).decode().rstrip("=\n")

    assert load("data:image/png;base64," + encoded).size == (5, 3)


def test_url_safe_base64_accepted() -> None:
    data = bytes(range(256)) * 3

    decoded = decode_data_url("data:image/png;base64," + base64.urlsafe_b64encode(data).decode(), PARAM, MAX_BYTES)

    assert decoded == data


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/cat.png",
        "https://127.0.0.1/cat.png",
        "/tmp/cat.png",
        "file:///tmp/cat.png",
        "data:image/png,rawbytes",
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png;base64",
        "data:image/png;base64,",
    ],
)
def test_unsupported_url_rejected(url: str) -> None:
    with pytest.raises(APIError) as caught:
        load(url)

    assert caught.value.status_code == 400
    assert caught.value.param == PARAM
    assert PARAM in caught.value.message


# Broken data and limits


def test_invalid_base64_rejected() -> None:
    with pytest.raises(APIError) as caught:
        load("data:image/png;base64,abc$def")

    assert caught.value.status_code == 400
    assert caught.value.param == PARAM
    assert "base64" in caught.value.message


def test_bytes_not_an_image_rejected() -> None:
    url = "data:image/png;base64," + base64.b64encode(b"%PDF-1.4 not an image").decode()

    with pytest.raises(APIError) as caught:
        load(url)

    assert caught.value.status_code == 400
    assert "not an image" in caught.value.message


def test_unsupported_format_rejected(make_data_url: Callable[..., str]) -> None:
    with pytest.raises(APIError) as caught:
        load(make_data_url(Image.new("RGB", (8, 8)), "PCX").replace("image/pcx", "image/png"))

    assert caught.value.status_code == 400
    assert "PNG, JPEG" in caught.value.message


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_file_rejected(image_format: str) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format=image_format)
    data = buffer.getvalue()
    url = "data:image/png;base64," + base64.b64encode(data[: len(data) // 2]).decode()

    with pytest.raises(APIError) as caught:
        load(url)

    assert caught.value.status_code == 400
    assert caught.value.param == PARAM
    assert "truncated" in caught.value.message


def test_over_pixel_limit_is_413(make_data_url: Callable[..., str]) -> None:
    with pytest.raises(APIError) as caught:
        load(make_data_url(Image.new("RGB", (40, 30)), "PNG"), max_pixels=40 * 30 - 1)

    assert caught.value.status_code == 413
    assert "40x30" in caught.value.message
    assert str(40 * 30 - 1) in caught.value.message
    assert "max-image-pixels" in caught.value.message


def test_at_pixel_limit_accepted(make_data_url: Callable[..., str]) -> None:
    assert load(make_data_url(Image.new("RGB", (40, 30)), "PNG"), max_pixels=40 * 30).size == (40, 30)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR that claim `width` x `height`, with one empty IDAT chunk."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_pixel_limit_checked_before_decoding() -> None:
    url = "data:image/png;base64," + base64.b64encode(png_header_only(5000, 4000)).decode()

    with pytest.raises(APIError) as caught:
        load(url, max_pixels=4096 * 4096)

    assert caught.value.status_code == 413
    assert "5000x4000" in caught.value.message


def test_pillow_decompression_bomb_guard_is_413() -> None:
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10
    url = "data:image/png;base64," + base64.b64encode(png_header_only(side, side)).decode()

    with pytest.raises(APIError) as caught:
        load(url, max_pixels=10 * side * side)

    assert caught.value.status_code == 413
    assert caught.value.code == "image_too_large"
    assert caught.value.param == PARAM


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_raw_base64_without_data_prefix_is_named(image_format: str) -> None:
    buffer = io.BytesIO()
    half_red_half_blue().save(buffer, format=image_format)
    raw = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(APIError) as caught:
        load(raw)
    assert caught.value.status_code == 400
    assert "without the data: prefix" in caught.value.message
