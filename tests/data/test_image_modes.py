"""Every image mode Pillow reads decodes to the right 8-bit RGB, and EXIF orientation is applied before sizes are
taken, in the loader (probe + decode) and in ``loom shards`` (the writer's re-encode and size fields) (issue 16,
item 3). Ordinary RGB / L images keep their exact pixels (tests/data's golden checks stay green)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(__file__))

from shardmaker import sample, write_shardset  # noqa: E402

from data_pipeline.data_config import DataConfig  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.sources import FolderSource  # noqa: E402
from data_pipeline.sources import decode_image as decode_full  # noqa: E402
from data_pipeline.transforms import decode_image, image_size  # noqa: E402
from data_pipeline.writer import WriterOptions, encode_image, write_shards  # noqa: E402

H, W = 6, 10  # a landscape test image: the quarter-turn orientations make it portrait


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def loader_rgb(data: bytes) -> np.ndarray:
    """The loader's pixels at the image's own (displayed) size: no resampling, so exactly its RGB conversion."""
    h, w = image_size(data)
    dec = decode_image(data, (h, w))
    assert dec.original_size == (h, w) and dec.pixels.shape == (h, w, 3) and dec.pixels.dtype == np.uint8
    return dec.pixels


def writer_rgb(data: bytes, image_format: str) -> np.ndarray:
    """What ``loom shards`` stores for ``data`` (re-encoded as ``image_format``), read back as the loader does."""
    enc = encode_image(data, image_format, 95, None, decode_full(data))
    assert (enc.height, enc.width) == image_size(data)
    return loader_rgb(enc.data)


# ------------------------------------------------------------------------------------------------ 16-bit grey


def test_a_16bit_grey_png_is_mid_grey_not_white(tmp_path):
    data = encoded(Image.fromarray(np.full((H, W), 32768, np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert (loader_rgb(data) == 128).all()  # 32768 / 65535 * 255 = 127.5 -> 128 (was 255: clipped)
    assert (writer_rgb(data, "png") == 128).all() and (writer_rgb(data, "jpg") == 128).all()

    # through shards: `loom shards` keeps the PNG byte for byte (image_format=keep) and the loader reads grey
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "grey.png").write_bytes(data)
    (tmp_path / "in" / "grey.txt").write_text("a grey picture")
    write_shards(FolderSource(tmp_path / "in"), tmp_path / "out", "g")
    loader = build_loader(DataConfig(urls=str(tmp_path / "out"), resolution=8, batch_size=1, num_workers=0,
                                     shuffle_buffer=0, full_pass=True))
    pixels = next(iter(loader)).pixels  # (1, 3, 8, 8) in [-1, 1]
    assert torch_close(pixels, 128 / 127.5 - 1)


def torch_close(x, value: float) -> bool:
    return bool((x - value).abs().max() < 1e-6)


# ------------------------------------------------------------------------------------------------ every mode


def _ramp(lo: float, hi: float, dtype) -> np.ndarray:
    return np.linspace(lo, hi, H * W).reshape(H, W).astype(dtype)  # (H, W)


def _rgb_source() -> np.ndarray:
    """Smooth colours (JPEG keeps them close), every pixel different."""
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([40 + yy * 30, 30 + xx * 20, 250 - (yy * W + xx) * 3], -1).astype(np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _cases():
    """``(name, PIL image, file formats that keep its mode, expected (H, W, 3) uint8, tolerance)``."""
    rgb = _rgb_source()
    grey = rgb[..., 0]
    alpha = np.tile(np.array([0, 64, 128, 255, 255], np.uint8), H * W // 5).reshape(H, W)
    scale16 = np.rint(_ramp(0, 65535, np.float64) * 255 / 65535).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    pal_rgb = np.asarray(palette.convert("RGB"))
    pa = palette.copy()
    pa.putalpha(Image.fromarray(alpha))  # PA: palette + alpha
    yield "1", Image.fromarray(grey > 127), ["TIFF", "PNG", "BMP"], _grey(np.where(grey > 127, 255, 0)), 0
    yield "L", Image.fromarray(grey), ["TIFF", "PNG", "JPEG"], _grey(grey), 0
    yield "LA", Image.fromarray(np.stack([grey, alpha], -1), "LA"), ["TIFF", "PNG"], \
        _over_white(_grey(grey), alpha), 1
    yield "P", palette, ["TIFF", "PNG", "BMP"], pal_rgb, 0
    yield "PA", pa, ["TIFF"], _over_white(pal_rgb, alpha), 1
    yield "RGB", Image.fromarray(rgb), ["TIFF", "PNG", "BMP"], rgb, 0
    yield "RGBA", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), ["TIFF", "PNG"], _over_white(rgb, alpha), 1
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[:, :5] = (0, 255, 255, 0)  # red
    cmyk[:, 5:] = (0, 0, 0, 255)  # black
    red_black = np.zeros((H, W, 3), np.uint8)
    red_black[:, :5] = (255, 0, 0)
    yield "CMYK", Image.fromarray(cmyk, "CMYK"), ["TIFF", "JPEG"], red_black, 0
    ycc = np.dstack([grey, np.full_like(grey, 128), np.full_like(grey, 128)])
    yield "YCbCr", Image.fromarray(ycc, "YCbCr"), ["TIFF"], _grey(grey), 1
    lab = np.zeros((H, W, 3), np.uint8)  # a*, b* are signed bytes in Pillow's LAB: 0 is neutral
    lab[:, :5, 0], lab[:, 5:, 0] = 0, 255  # L* 0 (black) | 100 (white)
    black_white = np.zeros((H, W, 3), np.uint8)
    black_white[:, 5:] = 255
    yield "LAB", Image.fromarray(lab, "LAB"), ["TIFF"], black_white, 2
    hsv = np.zeros((H, W, 3), np.uint8)
    hsv[:, :5] = (0, 255, 255)  # red
    hsv[:, 5:] = (0, 0, 128)  # grey
    red_grey = np.zeros((H, W, 3), np.uint8) + 128
    red_grey[:, :5] = (255, 0, 0)
    yield "HSV", Image.fromarray(hsv, "HSV"), [], red_grey, 0
    yield "RGBX", Image.fromarray(rgb).convert("RGBX"), [], rgb, 0
    premultiplied = np.rint(grey.astype(np.float64) * alpha / 255).astype(np.uint8)
    yield "La", Image.frombytes("La", (W, H), np.dstack([premultiplied, alpha]).tobytes()), [], \
        _over_white(_grey(grey), alpha), 2
    rgb_premultiplied = np.rint(rgb.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)
    yield "RGBa", Image.frombytes("RGBa", (W, H), np.dstack([rgb_premultiplied, alpha]).tobytes()), [], \
        _over_white(rgb, alpha), 2
    yield "I;16", Image.fromarray(_ramp(0, 65535, np.uint16)), ["PNG", "TIFF"], _grey(scale16), 0
    big = Image.frombytes("I;16B", (W, H), _ramp(0, 65535, ">u2").tobytes())
    yield "I;16B", big, ["TIFF"], _grey(scale16), 0
    signed = _ramp(-(2**31), 2**31 - 1, np.float64)
    yield "I", Image.fromarray(np.rint(signed).clip(-(2**31), 2**31 - 1).astype(np.int32), "I"), ["TIFF"], \
        _grey(np.rint((signed + 2**31) * 255 / (2**32 - 1)).astype(np.uint8)), 1
    floats = _ramp(-0.5, 1.5, np.float32)  # the [0, 1] float range, clipped outside
    yield "F", Image.fromarray(floats, "F"), ["TIFF"], _grey(np.rint(floats.clip(0, 1) * 255).astype(np.uint8)), 1


CASES = list(_cases())


@pytest.mark.parametrize("name,img,formats,expected,tol", CASES, ids=[c[0] for c in CASES])
def test_every_mode_decodes_to_8bit_rgb(name, img, formats, expected, tol):
    from data_pipeline.transforms import to_rgb

    assert img.mode == name
    got = np.asarray(to_rgb(img))
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    assert np.abs(got.astype(int) - expected).max() <= tol, f"{name}: {got[0, :6, 0]} vs {expected[0, :6, 0]}"
    for fmt in formats:
        data = encoded(img, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        opened = Image.open(io.BytesIO(data))
        if opened.mode != name and not (name == "I;16B" and opened.mode.startswith("I;16")):
            pytest.fail(f"{name} saved as {fmt} reopens as {opened.mode}")
        close(loader_rgb(data), expected, tol, fmt == "JPEG", f"loader, {name} as {fmt}")
        for image_format in ("png", "jpg", "keep"):
            lossy = fmt == "JPEG" or image_format == "jpg"
            close(writer_rgb(data, image_format), expected, tol, lossy, f"writer, {name} as {fmt} -> {image_format}")


def close(got: np.ndarray, expected: np.ndarray, tol: int, lossy: bool, what: str) -> None:
    """Exact up to ``tol`` (rounding in a colour conversion); a JPEG on the way: close on average."""
    diff = np.abs(got.astype(int) - expected)
    if lossy:
        assert diff.mean() <= 16 + tol, f"{what}: mean difference {diff.mean():.1f}"  # a mode bug: ~100
    else:
        assert diff.max() <= tol, f"{what}: {got[0, :6, 0]} vs {expected[0, :6, 0]}"


def test_a_16bit_pgm_uses_its_own_range():
    from data_pipeline.transforms import to_rgb

    pgm = b"P5 4 1 65535\n" + np.array([0, 32768, 65535, 257], ">u2").tobytes()
    img = Image.open(io.BytesIO(pgm))
    assert img.mode == "I" and list(np.asarray(to_rgb(img))[0, :, 0]) == [0, 128, 255, 1]
    assert list(loader_rgb(pgm)[0, :, 0]) == [0, 128, 255, 1]


# ------------------------------------------------------------------------------------------------ EXIF orientation


def _landscape() -> np.ndarray:
    """A (H, W, 3) image with no symmetry: every pixel distinct, so any wrong flip or turn shows."""
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([yy * 40, xx * 25, (yy * W + xx) * 4], -1).astype(np.uint8)


def _with_orientation(arr: np.ndarray, orientation: int, fmt: str) -> bytes:
    img = Image.fromarray(arr)
    if fmt == "TIFF":
        return encoded(img, fmt, tiffinfo={0x0112: orientation})
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(img, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))


# what each orientation does to display the stored pixels (EXIF 2.3, tag 0x0112), written out in numpy
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_sizes_are_taken(orientation, fmt):
    stored = _landscape()
    data = _with_orientation(stored, orientation, fmt)
    upright = UPRIGHT[orientation](stored)  # (h, w, 3) as displayed
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    lossy = 0 if fmt in ("PNG", "TIFF") else 48
    assert np.abs(reference.astype(int) - upright).max() <= lossy  # the table above agrees with Pillow's
    assert image_size(data) == upright.shape[:2]  # the probe: displayed (h, w), header only
    assert np.abs(loader_rgb(data).astype(int) - upright).max() <= lossy
    for image_format in ("keep", "png"):
        enc = encode_image(data, image_format, 95, None, decode_full(data))
        assert (enc.height, enc.width) == upright.shape[:2]
        assert np.abs(loader_rgb(enc.data).astype(int) - upright).max() <= lossy


def test_a_sideways_jpeg_decodes_upright_with_draft_and_crops(tmp_path):
    yy, xx = np.mgrid[0:120, 0:200]
    stored = np.stack([xx, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)  # (120, 200, 3) landscape as stored
    data = _with_orientation(stored, 6, "JPEG")
    upright = encoded(Image.fromarray(np.ascontiguousarray(np.rot90(stored, -1))), "JPEG", quality=100)
    assert image_size(data) == (200, 120)
    for target in ((40, 24), (30, 30), (64, 16)):
        for draft in (True, False):
            a = decode_image(data, target, "center", draft=draft)
            b = decode_image(upright, target, "center", draft=draft)
            assert a.original_size == (200, 120) and a.crop_top_left == b.crop_top_left
            assert np.abs(a.pixels.astype(int) - b.pixels).mean() < 3, (target, draft)


def test_size_conditioning_of_a_portrait_photo_through_shards(tmp_path):
    data = _with_orientation(_landscape(), 6, "JPEG")  # a 10-wide, 6-high sensor image shown as 6 x 10 portrait
    write_shardset(tmp_path / "raw", "p", [[("photo", {**sample("photo"), "jpg": data})]])
    with tarfile.open(tmp_path / "raw" / "p-000000.tar") as tf:  # the jpg member the loader reads: png removed
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if not m.name.endswith(".png")}
    write_shardset(tmp_path / "shards", "p", [[("photo", {k.split(".", 1)[1]: v for k, v in members.items()})]])
    loader = build_loader(DataConfig(urls=str(tmp_path / "shards"), resolution=8, batch_size=1, num_workers=0,
                                     shuffle_buffer=0, full_pass=True))
    batch = next(iter(loader))
    assert batch.original_size.tolist() == [[W, H]]  # (h, w) as displayed: portrait

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photo.jpg").write_bytes(data)
    (tmp_path / "in" / "photo.txt").write_text("a photo")
    for image_format in ("keep", "jpg", "png"):
        out = tmp_path / f"out_{image_format}"
        write_shards(FolderSource(tmp_path / "in"), out, "s", WriterOptions(image_format=image_format))
        with tarfile.open(out / "s-000000.tar") as tf:
            meta = json.loads(tf.extractfile("000000000.json").read())
        assert (meta["height"], meta["width"]) == (W, H), image_format
