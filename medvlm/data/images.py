"""Image loading: PNG, JPEG and DICOM (and anything Pillow reads) to 8-bit RGB, the one loader
the CLI and both backends use: :func:`load_image` for a file, :func:`as_rgb8` for whatever a
backend's score() is given (a path, a PIL image of any mode, a numpy array), by the same rules.

Image readability (:func:`check_image`, run by the CSV validation once per path): DICOM is
read in full with pydicom and its first frame decoded (catches truncated pixel data and
missing decoders); PNG is ``verify()``-ed (walks every chunk and checks its CRC, which
catches truncation and bit corruption); JPEG is decoded at reduced scale (``draft``), which
runs the whole entropy decode and so catches truncation; other formats Pillow knows are
decoded in full.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


class ImageLoadError(ValueError):
    """An image that cannot be found, read or decoded; the message names the file."""


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a model.

    path           the file it came from (None for an in-memory image: see as_rgb8)
    image          PIL image, mode "RGB", 8 bits per channel
    original_size  (width, height) of the stored image (first frame for multi-frame)
    source_kind    "dicom", "png", "jpeg", or Pillow's format name in lower case
    notes          what was done to it, e.g. "MONOCHROME1 inverted",
                   "VOI LUT applied (window center 40, width 400)"
    """

    path: Path | None
    image: Image.Image
    original_size: tuple[int, int]
    source_kind: str
    notes: tuple[str, ...] = ()


def _sniff_kind(path: Path) -> str:
    """'dicom', 'png', 'jpeg' or 'pil' (anything else: let Pillow try)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"
    return "pil"


def _existing_kind(path) -> tuple[Path, str]:
    """(path, sniffed kind) of an existing file; ImageLoadError naming it otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ImageLoadError(f"{p}: is a directory, not an image file")
    if not p.is_file():
        raise ImageLoadError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ImageLoadError(f"{p}: empty file (0 bytes)")
    try:
        return p, _sniff_kind(p)
    except OSError as e:
        raise ImageLoadError(f"{p}: cannot read ({e})") from e


def check_image(path: str | os.PathLike[str]) -> str:
    """Check that ``path`` is a readable image; return its kind. Raises ImageLoadError.

    DICOM: read in full and first frame decoded. PNG: ``verify()`` (every chunk's CRC).
    JPEG: decoded at reduced scale (full entropy decode). Other formats: decoded in full.
    """
    p, kind = _existing_kind(path)
    if kind == "dicom":
        ds = _read_dicom(p)
        _first_frame(ds, p)
        return "dicom"
    try:
        with Image.open(p) as im:
            fmt = (im.format or kind).lower()
            if kind == "png":
                im.verify()
            elif kind == "jpeg":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            else:
                im.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{p}: cannot decode as {kind} ({e})") from e
    return fmt


def load_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Load a PNG/JPEG/DICOM (or other Pillow-readable) image as 8-bit RGB.

    PNG/JPEG: EXIF orientation applied; 8-bit grayscale kept as is; 16-bit/32-bit/float
    grayscale scaled to 8 bits by the min-max of its actual range (not truncated).
    DICOM (pydicom): first frame of multi-frame files; modality LUT (rescale
    slope/intercept or LUT sequence); VOI LUT sequence or window center/width (the first
    of several), else min-max of the actual range; MONOCHROME1 (or a Presentation LUT
    Shape of INVERSE on MONOCHROME2) inverted so that dense tissue is bright; 8 bits; RGB.
    PALETTE COLOR is expanded through its palette, YBR converted to RGB.
    Every failure raises ImageLoadError naming the file.
    """
    p, kind = _existing_kind(path)
    if kind == "dicom":
        return _load_dicom(p)
    return _load_pil(p, kind)


def _to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255] with clipping; zeros when hi <= lo."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float64) - lo) / (hi - lo)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112


def _gray_to_rgb8(arr: np.ndarray, what: str) -> tuple[Image.Image, list[str]]:
    """2-D grayscale of more than 8 bits (any integer or float dtype) -> 8-bit RGB, scaled by
    the min-max of its finite values (NaN -> the minimum; +-inf clipped). Returns (image, notes)."""
    arr = arr.astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    u8 = _to_uint8(np.nan_to_num(arr, nan=lo), lo, hi)
    notes = [f"{what} grayscale scaled to 8 bits by min-max of its range [{lo:g}, {hi:g}]"]
    if hi <= lo:
        notes.append("constant image")
    return Image.fromarray(u8).convert("RGB"), notes


def _pil_to_rgb8(im: Image.Image, owned: bool) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """A decoded PIL image of any mode -> (8-bit RGB image, (width, height), notes): EXIF
    orientation applied; 16-/32-bit and float grayscale scaled by the min-max of its range;
    RGB kept; other modes converted by Pillow (alpha dropped). owned: the caller may keep
    `im` itself (else an RGB input is copied, as for a file about to be closed)."""
    notes: list[str] = []
    if im.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):
        im = ImageOps.exif_transpose(im)
        notes.append("EXIF orientation applied")
        owned = True
    mode = im.mode
    if mode in _HIGH_BIT_MODES:
        rgb, more = _gray_to_rgb8(np.asarray(im), mode)
        notes += more
    elif mode == "RGB":
        rgb = im if owned else im.copy()
    else:
        if "A" in mode or "a" in mode or (mode == "P" and "transparency" in im.info):
            notes.append("alpha channel dropped")
        if mode not in ("L", "P", "1"):
            notes.append(f"converted from {mode}")
        rgb = im.convert("RGB")
    return rgb, (int(im.size[0]), int(im.size[1])), notes


def _load_pil(p: Path, kind: str) -> LoadedImage:
    try:
        with Image.open(p) as im:
            im.load()
            fmt = (im.format or kind).lower()
            rgb, size, notes = _pil_to_rgb8(im, owned=False)
    except ImageLoadError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{p}: cannot decode as {kind} ({e})") from e
    return LoadedImage(p, rgb, size, fmt, tuple(notes))


def as_rgb8(image: str | os.PathLike[str] | Image.Image | np.ndarray) -> LoadedImage:
    """Any image a backend accepts -> LoadedImage (8-bit RGB), by the rules of load_image.

    image  a path (str or PathLike): load_image(path) (PNG/JPEG/DICOM/any Pillow format);
           a PIL image of any mode: as load_image treats a decoded file (EXIF orientation
               applied; "I;16", "I", "F" and other >8-bit grayscale scaled to 8 bits by the
               min-max of its range, never clipped; "L"/"P"/"RGBA"/... converted by Pillow);
           a numpy array: 2-D [H, W] grayscale, uint8 kept as is, any other integer or float
               dtype scaled by min-max like a 16-bit or float image; or [H, W, 3] uint8 RGB.
    returns LoadedImage: .image mode "RGB" 8 bits (for an RGB PIL input without EXIF
            rotation, the same object), .original_size (width, height), .source_kind ("pil",
            "array", or the file's kind), .notes (what was done), .path (None in memory).
    Raises ValueError (ImageLoadError for files) saying what to pass instead.
    """
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Image.Image):
        try:
            rgb, size, notes = _pil_to_rgb8(image, owned=True)
        except (OSError, ValueError) as e:  # a mode Pillow cannot convert to RGB
            raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to 8-bit RGB ({e}); "
                             "pass an RGB, L or 16-bit/float grayscale image") from e
        return LoadedImage(None, rgb, size, "pil", tuple(notes))
    if isinstance(image, np.ndarray):
        return LoadedImage(None, *_array_to_rgb8(image))
    raise ValueError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}"
                     + (" (convert a tensor with .numpy())" if hasattr(image, "numpy") else ""))


def _array_to_rgb8(arr: np.ndarray) -> tuple[Image.Image, tuple[int, int], str, tuple[str, ...]]:
    """(image, (width, height), "array", notes) for as_rgb8's numpy input."""
    shape, dtype = tuple(arr.shape), arr.dtype
    if 0 in shape:
        raise ValueError(f"image array of shape {shape} is empty")
    if arr.ndim == 3 and shape[2] == 3 and dtype == np.uint8:
        rgb, notes = Image.fromarray(np.ascontiguousarray(arr), "RGB"), []
    elif arr.ndim == 2 and dtype == np.uint8:
        rgb, notes = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB"), []
    elif arr.ndim == 2 and dtype.kind in "iuf":  # signed, unsigned integer or float (not bool, complex)
        rgb, notes = _gray_to_rgb8(arr, f"{dtype} array")
    else:
        raise ValueError(
            f"image array of shape {shape} and dtype {dtype} is not supported: pass a 2-D [H, W] grayscale array "
            "(any integer or float dtype) or an [H, W, 3] uint8 RGB array"
        )
    return rgb, (int(shape[1]), int(shape[0])), "array", tuple(notes)


def _read_dicom(p: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    with open(p, "rb") as fh:
        fh.seek(128)
        force = fh.read(4) != b"DICM"  # preamble-less files: only reached for a .dcm suffix
    try:
        ds = pydicom.dcmread(p, force=force)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImageLoadError(f"{p}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise ImageLoadError(f"{p}: DICOM file has no pixel data")
    if "TransferSyntaxUID" not in ds.file_meta:
        # No file meta (a preamble-less file): the encoding the dataset was read with is the
        # only possible one for native pixel data.
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            raise ImageLoadError(f"{p}: DICOM file has no transfer syntax and its encoding is unknown")
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _first_frame(ds, p: Path) -> tuple[np.ndarray, int]:
    """(first frame's pixels, number of frames)."""
    from pydicom.pixels import pixel_array

    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    try:
        arr = pixel_array(ds, index=0)
    except Exception as e:  # pydicom raises many types for bad/undecodable pixel data
        ts = ds.file_meta.TransferSyntaxUID
        raise ImageLoadError(
            f"{p}: cannot decode DICOM pixel data ({ts.name}): {type(e).__name__}: {e}"
        ) from e
    return arr, n_frames


def _load_dicom(p: Path) -> LoadedImage:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

    ds = _read_dicom(p)
    arr, n_frames = _first_frame(ds, p)
    notes: list[str] = []
    if n_frames > 1:
        notes.append(f"multi-frame ({n_frames} frames): first frame used")
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim != 2:
                raise ImageLoadError(f"{p}: {pi} frame has shape {arr.shape}, expected 2-D")
            u8 = _dicom_grayscale(ds, arr, pi, notes, apply_modality_lut, apply_voi, apply_windowing)
            rgb = Image.fromarray(u8).convert("RGB")
        elif pi == "PALETTE COLOR":
            colour = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            colour = colour if bits <= 8 else _to_uint8(colour, 0, 2**bits - 1)
            notes.append(f"PALETTE COLOR expanded through its {bits}-bit palette")
            rgb = Image.fromarray(np.ascontiguousarray(colour.astype(np.uint8)), "RGB")
        elif pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ImageLoadError(f"{p}: {pi} frame has shape {arr.shape}, expected rows x cols x 3")
            if pi != "RGB":
                notes.append(f"{pi} converted to RGB")
            bits = int(ds.get("BitsStored", 8) or 8)
            colour = arr if arr.dtype == np.uint8 else _to_uint8(arr, 0, 2**bits - 1)
            rgb = Image.fromarray(np.ascontiguousarray(colour), "RGB")
        else:
            raise ImageLoadError(f"{p}: unsupported photometric interpretation {pi!r}")
    except ImageLoadError:
        raise
    except Exception as e:  # LUT/window tags that pydicom rejects
        raise ImageLoadError(f"{p}: cannot apply the DICOM display pipeline ({type(e).__name__}: {e})") from e
    size = (int(rgb.width), int(rgb.height))
    return LoadedImage(p, rgb, size, "dicom", tuple(notes))


def _dicom_grayscale(ds, arr, pi, notes, apply_modality_lut, apply_voi, apply_windowing) -> np.ndarray:
    """Modality LUT -> VOI (LUT sequence, window, or min-max) -> polarity -> uint8."""
    if ds.get("ModalityLUTSequence"):
        arr = apply_modality_lut(arr, ds)
        notes.append("modality LUT sequence applied")
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        arr = apply_modality_lut(arr, ds)
        if slope != 1.0 or intercept != 0.0:
            notes.append(f"modality rescale applied (slope {slope:g}, intercept {intercept:g})")

    voi_seq = ds.get("VOILUTSequence")
    has_voi_lut = bool(voi_seq) and all(k in voi_seq[0] for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_voi_lut:
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.round(arr).astype(np.int64)
        out = apply_voi(arr, ds, 0)
        lut = np.asarray(_voi_lut_values(ds), dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        notes.append(f"VOI LUT applied (VOI LUT sequence, output range of the LUT [{lo:g}, {hi:g}])")
    elif has_window:
        center_el, width_el = ds["WindowCenter"], ds["WindowWidth"]
        center = float(center_el.value[0] if center_el.VM > 1 else center_el.value)
        width = float(width_el.value[0] if width_el.VM > 1 else width_el.value)
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = apply_windowing(arr, ds, 0)
        # The window's output range (pydicom picks it from bits stored, signedness and
        # rescale): read it back by windowing two values far outside the window.
        with np.errstate(over="ignore"):
            probe = apply_windowing(np.array([-1e12, 1e12]), ds, 0)
        lo, hi = float(probe[0]), float(probe[1])
        extra = f", function {func}" if func != "LINEAR" else ""
        several = f", first of {center_el.VM} windows" if center_el.VM > 1 else ""
        notes.append(f"VOI LUT applied (window center {center:g}, width {width:g}{extra}{several})")
    else:
        out = arr.astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
        notes.append(f"no VOI LUT or window in header: min-max of the actual range [{lo:g}, {hi:g}]")
    u8 = _to_uint8(np.asarray(out), lo, hi)
    if hi <= lo:
        notes.append("constant image")
    if pi == "MONOCHROME1":
        u8 = 255 - u8
        notes.append("MONOCHROME1 inverted (dense = bright)")
    elif str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        u8 = 255 - u8
        notes.append("Presentation LUT Shape INVERSE: inverted")
    return u8


def _voi_lut_values(ds) -> list[int]:
    """LUT Data of the first VOI LUT item as integers (US or OW encoded)."""
    import struct

    item = ds.VOILUTSequence[0]
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        n = len(data) // 2
        little = ds.file_meta._tsyntax_encoding[1] if hasattr(ds, "file_meta") else True
        return list(struct.unpack(f"{'<' if little in (True, None) else '>'}{n}H", data[: 2 * n]))
    if isinstance(data, int):
        return [data]
    return [int(v) for v in data]
