"""medvlm.data.images.as_rgb8: an in-memory image (PIL of any mode, numpy array) or a path made
8-bit RGB by exactly the rules load_image applies to a file (the backends' one converter)."""

import numpy as np
import pytest
from PIL import Image

from medvlm.data.images import as_rgb8, load_image


def _gray16() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(300, 60_000, (40, 50)).astype(np.uint16)


def _same(a, b):
    assert a.image.mode == b.image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.original_size == b.original_size and a.notes == b.notes


def test_sixteen_bit_pil_image_is_converted_as_its_file_is(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(_gray16()).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        got = as_rgb8(im)
        clipped = np.asarray(im.convert("RGB"))
    want = load_image(path)
    _same(got, want)
    assert got.path is None and got.source_kind == "pil" and want.path == path
    assert got.notes[0].startswith("I;16 grayscale scaled to 8 bits by min-max of its range")
    assert (clipped == 255).mean() > 0.9 and (np.asarray(got.image) == 255).mean() < 0.01


def test_float_image_and_array_with_nan_are_scaled_alike(tmp_path):
    arr = _gray16().astype(np.float32) / 100.0 - 50.0
    arr[3, 4] = np.nan
    path = tmp_path / "f.tif"
    Image.fromarray(arr, "F").save(path)
    want = load_image(path)
    with Image.open(path) as im:
        assert im.mode == "F"
        _same(as_rgb8(im), want)
    from_array = as_rgb8(arr)
    np.testing.assert_array_equal(np.asarray(from_array.image), np.asarray(want.image))
    assert from_array.source_kind == "array" and from_array.notes[0].startswith("float32 array grayscale scaled")
    assert np.asarray(from_array.image)[3, 4, 0] == 0  # NaN -> the minimum, as load_image does


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32, np.float64])
def test_grayscale_arrays_of_any_dtype_are_min_max_scaled(dtype):
    arr = (_gray16().astype(np.int64) - 20_000).astype(dtype)
    got = np.asarray(as_rgb8(arr).image)
    lo, hi = float(arr.min()), float(arr.max())
    want = np.round((arr.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))


def test_eight_bit_inputs_are_kept_and_an_rgb_image_is_not_copied():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    out = as_rgb8(rgb)
    assert out.image is rgb and out.notes == () and out.original_size == (30, 20)
    np.testing.assert_array_equal(np.asarray(as_rgb8(np.asarray(rgb)).image), np.asarray(rgb))
    gray = np.asarray(rgb)[..., 0]
    np.testing.assert_array_equal(np.asarray(as_rgb8(gray).image), np.asarray(Image.fromarray(gray).convert("RGB")))
    la = Image.fromarray(gray).convert("LA")
    assert as_rgb8(la).notes == ("alpha channel dropped", "converted from LA")


def test_exif_orientation_of_an_opened_jpeg_is_applied_as_for_its_file(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path, exif=exif)
    want = load_image(path)
    assert want.image.size == (20, 30) and "EXIF orientation applied" in want.notes
    with Image.open(path) as im:
        _same(as_rgb8(im), want)


def test_a_path_goes_through_load_image(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(_gray16()).save(path)
    _same(as_rgb8(str(path)), load_image(path))
    assert as_rgb8(path).path == path


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 5, 4), np.uint8), r"shape \(4, 5, 4\) and dtype uint8 is not supported"),
        (np.zeros((4, 5, 3), np.uint16), r"or an \[H, W, 3\] uint8 RGB array"),
        (np.zeros((4, 5), np.complex64), "dtype complex64 is not supported"),
        (np.zeros((4, 5), bool), "dtype bool is not supported"),
        (np.zeros((0, 5), np.uint8), "is empty"),
        (b"\x89PNG", "expected an image path, a PIL image or a numpy array, got bytes"),
    ],
)
def test_unsupported_inputs_are_refused_saying_what_to_pass(bad, message):
    with pytest.raises(ValueError, match=message):
        as_rgb8(bad)
