"""storage.images: upload validation/normalisation and the content-addressed store.

Every test image is generated here (Pillow/numpy) or comes from skimage.data.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data as skdata

from storage.images import DecodedImage, ImageRejected, ImageStore, decode_upload, sanitize_name
from storage.image_decode import strip_jpeg_metadata

# -- helpers ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG written by hand (for 16-bit RGB and huge images Pillow will not write).

    ``rows`` yields each row's raw bytes (without the filter byte)."""
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\x00" + row) for row in rows) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def astronaut_jpeg(astronaut) -> bytes:
    return encode(Image.fromarray(astronaut), "JPEG", quality=90)


@pytest.fixture
def store(tmp_data_dir: Path) -> ImageStore:
    return ImageStore(tmp_data_dir / "images")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]


# -- accepted uploads --------------------------------------------------------------------


def test_plain_jpeg_is_stored_byte_for_byte(astronaut_jpeg) -> None:
    d = decode_upload(astronaut_jpeg, "astronaut.jpg")
    assert d.data == astronaut_jpeg and d.mime == "image/jpeg" and d.ext == "jpg"
    assert (d.width, d.height) == (512, 512) and d.rgb.shape == (512, 512, 3) and d.rgb.dtype == np.uint8
    assert d.sha256 == d.upload_sha256 and d.source_format == "JPEG" and d.notes == ()
    np.testing.assert_array_equal(d.rgb, np.asarray(Image.open(io.BytesIO(astronaut_jpeg)).convert("RGB")))


def test_png_with_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:, 3] = 128  # right half half transparent
    d = decode_upload(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "alpha.png")
    assert d.mime == "image/png" and d.rgb.shape == (8, 8, 3)
    assert (d.rgb[:, :4] == 255).all()
    np.testing.assert_allclose(d.rgb[0, 6], [255, 127, 127], atol=1)
    assert any("white" in n for n in d.notes)


def test_palette_png_with_transparency() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    d = decode_upload(encode(img, "PNG", transparency=0), "pal.png")
    assert tuple(d.rgb[0, 0]) == (255, 255, 255)  # transparent blue -> white
    assert tuple(d.rgb[1, 1]) == (0, 255, 0)


def test_16bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    d = decode_upload(encode(img, "PNG"), "deep.png")
    expected = np.round(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(d.rgb[..., 0], expected)
    assert (d.rgb[..., 0] == d.rgb[..., 2]).all()
    assert any("16-bit" in n for n in d.notes)


def test_16bit_rgb_png() -> None:
    px = np.array([[[0xFFFF, 0x8000, 0x0000], [0x1234, 0x00FF, 0xABCD]]], dtype=">u2")
    data = raw_png(2, 1, 16, 2, [px[0].tobytes()])
    d = decode_upload(data, "deep_rgb.png")
    np.testing.assert_allclose(d.rgb[0].astype(int), np.round(px[0] / 257.0), atol=1)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_other_colour_modes_become_rgb(mode: str) -> None:
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[:, 5:] = 255
    img = Image.fromarray(rgb).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    d = decode_upload(encode(img, fmt), f"x.{fmt.lower()}")
    assert d.rgb.shape == (6, 10, 3)
    assert (d.rgb[:, :3] < 30).all() and (d.rgb[:, 7:] > 225).all()
    assert d.mime == ("image/jpeg" if fmt == "JPEG" else "image/png")


def test_cmyk_jpeg_colour() -> None:
    d = decode_upload(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "cmyk.jpg")
    np.testing.assert_allclose(d.rgb[8, 8].astype(int), [255, 0, 0], atol=8)
    assert d.mime == "image/jpeg" and "CMYK converted to RGB" in d.notes
    # the stored bytes are a plain RGB JPEG that decodes to exactly ``rgb``
    assert Image.open(io.BytesIO(d.data)).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(d.data))), d.rgb)


def test_grayscale_jpeg_is_kept_and_read_as_rgb() -> None:
    gray = encode(Image.fromarray(skdata.camera()), "JPEG")
    d = decode_upload(gray, "camera.jpg")
    assert d.data == gray and d.rgb.shape == (512, 512, 3)
    assert (d.rgb[..., 0] == d.rgb[..., 1]).all()


def test_animated_gif_keeps_first_frame() -> None:
    frames = []
    for colour in range(3):
        frame = Image.new("P", (12, 12), colour)
        frame.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
        frames.append(frame)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    d = decode_upload(data, "anim.gif")
    assert (d.rgb == [255, 0, 0]).all()
    assert d.mime == "image/png" and d.source_format == "GIF"
    assert any("first of 3 frames" in n for n in d.notes)


def _quadrants(h: int = 40, w: int = 60) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (255, 0, 0)
    img[: h // 2, w // 2 :] = (0, 255, 0)
    img[h // 2 :, : w // 2] = (0, 0, 255)
    img[h // 2 :, w // 2 :] = (255, 255, 0)
    return img


#: display transform for each EXIF orientation, written from the EXIF spec with numpy
EXIF_TRANSFORMS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirror horizontally
    3: lambda a: a[::-1, ::-1],  # rotate 180
    4: lambda a: a[::-1],  # mirror vertically
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirror horizontally, then rotate 270 CW
    6: lambda a: np.rot90(a, -1),  # rotate 90 CW
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirror horizontally, then rotate 90 CW
    8: lambda a: np.rot90(a, 1),  # rotate 270 CW
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    pixels = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    d = decode_upload(data, "phone.jpg")
    expected = EXIF_TRANSFORMS[orientation](pixels)
    assert d.rgb.shape == expected.shape and (d.width, d.height) == (expected.shape[1], expected.shape[0])
    h, w = expected.shape[:2]
    for y, x in [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]:
        np.testing.assert_allclose(d.rgb[y, x].astype(int), expected[y, x], atol=40)
    if orientation == 1:
        assert d.data == strip_jpeg_metadata(data) and d.notes == ()  # pixels kept, EXIF dropped
    else:
        assert d.mime == "image/jpeg" and d.data != data
        assert any("EXIF orientation" in n for n in d.notes)
        stored = Image.open(io.BytesIO(d.data))
        assert stored.getexif().get(0x0112, 1) == 1  # stored upright: no rotation left to apply
        np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), d.rgb)


def test_identical_uploads_get_identical_content_address() -> None:
    pixels = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(Image.fromarray(pixels), "JPEG", exif=exif)
    alpha_png = encode(Image.fromarray(np.dstack([pixels, np.full(pixels.shape[:2], 200, np.uint8)])), "PNG")
    for upload in (rotated, alpha_png):
        first, second = decode_upload(upload, "a"), decode_upload(upload, "b")
        assert first.sha256 == second.sha256 and first.data == second.data
        assert first.upload_sha256 == second.upload_sha256 != first.sha256


# -- rejected uploads -------------------------------------------------------------------------


def test_zero_byte_file() -> None:
    with pytest.raises(ImageRejected, match="empty"):
        decode_upload(b"", "empty.jpg")


@pytest.mark.parametrize(
    "payload",
    [b"hello, this is not an image", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", b"<svg xmlns='http://www.w3.org/2000/svg'/>"],
)
def test_non_images(payload: bytes) -> None:
    with pytest.raises(ImageRejected, match="not an image"):
        decode_upload(payload, "photo.jpg")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_jpeg(astronaut_jpeg, keep: float) -> None:
    with pytest.raises(ImageRejected, match="truncated|damaged"):
        decode_upload(astronaut_jpeg[: int(len(astronaut_jpeg) * keep)], "cut.jpg")


def test_truncated_png(astronaut) -> None:
    png = encode(Image.fromarray(astronaut), "PNG")
    with pytest.raises(ImageRejected, match="truncated|damaged"):
        decode_upload(png[: len(png) // 2], "cut.png")


def test_truncated_jpeg_rejected_even_if_someone_enabled_truncated_loading(astronaut_jpeg, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageRejected):
        decode_upload(astronaut_jpeg[: len(astronaut_jpeg) // 2], "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_20000x20000_png() -> None:
    # a valid 1-bit 20000x20000 PNG of ~50 kB: 400 megapixels if decoded
    row = bytes(2500)
    bomb = raw_png(20000, 20000, 1, 0, (row for _ in range(20000)))
    assert len(bomb) < 200_000
    with pytest.raises(ImageRejected, match="too large"):
        decode_upload(bomb, "bomb.png")


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # header says 8000x8000 (64 MP, above the 50 MP default, below Pillow's own limit);
    # the pixel data is garbage, so a decoder would fail with "damaged": the limit must
    # fire first
    fake = raw_png(8000, 8000, 8, 2, [])
    with pytest.raises(ImageRejected, match="megapixels"):
        decode_upload(fake, "big.png")
    with pytest.raises(ImageRejected, match="damaged"):
        decode_upload(fake, "big.png", max_pixels=100_000_000)
    small = encode(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(ImageRejected, match="megapixels"):
        decode_upload(small, "small.png", max_pixels=19_999)
    assert decode_upload(small, "small.png", max_pixels=20_000).width == 200


def test_file_size_limit(astronaut_jpeg) -> None:
    with pytest.raises(ImageRejected, match="MiB"):
        decode_upload(astronaut_jpeg, "big.jpg", max_bytes=len(astronaut_jpeg) - 1)
    assert decode_upload(astronaut_jpeg, "ok.jpg", max_bytes=len(astronaut_jpeg)).width == 512


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("../../etc/passwd", "passwd"),
        ("<script>alert(1)</script>.jpg", "script>.jpg"),  # last path component after "/"
        ("<img src=x onerror=alert(1)>.png", "<img src=x onerror=alert(1)>.png"),  # HTML kept as text
        ("a\\b/c.png", "c.png"),
        ("C:\\Users\\me\\Pictures\\holiday.jpg", "holiday.jpg"),
        ("bad\x00name\n\r\t.jpg", "badname.jpg"),
        ("evil\u202egpj.exe", "evilgpj.exe"),  # right-to-left override removed
        ("  spaced   out  .png ", "spaced out .png"),
        ("..", "unnamed"),
        ("dir/", "unnamed"),
        ("", "unnamed"),
        (None, "unnamed"),
        ("Zoë 👩‍👩‍👧.jpg", "Zoë 👩‍👩‍👧.jpg"),  # emoji joiners survive
    ],
)
def test_sanitize_name(raw, clean) -> None:
    assert sanitize_name(raw) == clean


def test_sanitize_name_limits_length_and_keeps_extension() -> None:
    name = sanitize_name("x" * 1000 + ".jpeg")
    assert len(name) == 255 and name.endswith(".jpeg")
    assert len(sanitize_name("y" * 1000)) == 255


@pytest.mark.parametrize("name", ["../../etc/passwd", "<script>alert(1)</script>.jpg", "a\\b/c.png"])
def test_hostile_names_never_reach_the_filesystem(store: ImageStore, name: str) -> None:
    d = decode_upload(encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"), name)
    assert "/" not in d.name and "\\" not in d.name
    sha, path, _ = store.put(d)
    assert path.name == f"{sha}.png" and path.resolve().is_relative_to(store.root)
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [f"{sha}.png"]


# -- the store -----------------------------------------------------------------------------------


def test_put_open_and_layout(store: ImageStore, astronaut_jpeg) -> None:
    d = decode_upload(astronaut_jpeg, "astronaut.jpg")
    sha, path, is_new = store.put(d)
    assert is_new and sha == d.sha256
    assert path == store.root / sha[:2] / sha[2:4] / f"{sha}.jpg" == store.path(sha)
    assert path.read_bytes() == astronaut_jpeg
    assert store.exists(sha) and store.verify(sha) and list(store.iter_shas()) == [sha]
    np.testing.assert_array_equal(store.open(sha), d.rgb)
    assert store.read_bytes(sha) == astronaut_jpeg
    assert temp_files(store.root) == []


def test_re_put_leaves_the_object_untouched(store: ImageStore) -> None:
    d = decode_upload(encode(Image.fromarray(_quadrants()), "PNG"), "q.png")
    sha, path, is_new = store.put(d)
    before = path.stat()
    sha2, path2, is_new2 = store.put(decode_upload(encode(Image.fromarray(_quadrants()), "PNG"), "other.png"))
    assert (sha2, path2, is_new, is_new2) == (sha, path, True, False)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert temp_files(store.root) == []


def test_existing_object_is_never_overwritten(store: ImageStore) -> None:
    d = decode_upload(encode(Image.new("RGB", (5, 5), (9, 9, 9)), "PNG"), "x.png")
    target = store.object_path(d.sha256, "png")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"damaged object")  # e.g. a disk error after an earlier put
    assert store.put(d)[2] is False
    assert target.read_bytes() == b"damaged object" and not store.verify(d.sha256)


def test_put_refuses_mismatched_hash(store: ImageStore) -> None:
    d = decode_upload(encode(Image.new("RGB", (5, 5)), "PNG"), "x.png")
    forged = DecodedImage(**{**d.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="sha256"):
        store.put(forged)
    assert list(store.root.rglob("*.png")) == []


def test_delete(store: ImageStore) -> None:
    sha, path, _ = store.put(decode_upload(encode(Image.new("RGB", (5, 5)), "PNG"), "x.png"))
    assert store.delete(sha) is True
    assert not path.exists() and not store.exists(sha)
    with pytest.raises(FileNotFoundError):
        store.path(sha)
    assert store.delete(sha) is False


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 64 + "/x"])
def test_hash_arguments_are_validated(store: ImageStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.path(bad)
    with pytest.raises(ValueError):
        store.delete(bad)


def test_thumbnail_crops_box_and_limits_size(store: ImageStore) -> None:
    pixels = _quadrants(400, 600)
    sha, _, _ = store.put(decode_upload(encode(Image.fromarray(pixels), "PNG"), "q.png"))
    whole = store.thumbnail(sha, size=150)
    assert whole.shape == (100, 150, 3)
    crop = store.thumbnail(sha, (310.2, 20.5, 590.0, 180.0), size=64)  # inside the green quadrant
    assert max(crop.shape[:2]) == 64 and (np.abs(crop.astype(int) - [0, 255, 0]) <= 2).all()
    grown = store.thumbnail(sha, (250, 150, 350, 250), size=1000, margin=0.5)
    assert grown.shape == (200, 200, 3)  # 100 px box + 50 px each side, never enlarged
    clipped = store.thumbnail(sha, (-50, -50, 50, 50), size=1000)
    assert clipped.shape == (50, 50, 3)
    with pytest.raises(ValueError):
        store.thumbnail(sha, (700, 10, 800, 20))


def test_stale_temp_files_are_cleaned(store: ImageStore) -> None:
    folder = store.root / "ab" / "cd"
    folder.mkdir(parents=True)
    old, fresh = folder / ".tmp-old.part", folder / ".tmp-new.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert store.remove_stale_temp_files(older_than_s=3600) == 1
    assert not old.exists() and fresh.exists()


def test_non_images_are_refused_even_after_ultralytics_patched_pillow() -> None:
    """ultralytics swaps PIL.Image.open for a wrapper that tries to install pi-heif on
    unknown files; the upload path must still answer with a plain refusal."""
    import ultralytics  # noqa: F401  (applies the patch)
    from PIL import Image

    assert Image.open.__module__ != "PIL.Image"  # the patch this test is about is in place
    with pytest.raises(ImageRejected, match="not an image"):
        decode_upload(b"this is not an image at all", "notes.jpg")
