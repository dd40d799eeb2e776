"""Expert region files: the formats researchers have, read into :class:`Region` s.

:func:`read_regions` reads one file, its format detected from the header (``.gz`` and one-member
``.zip`` files are read as they ship); :func:`medvlm.data.regions.join_regions` attaches the regions
to the question rows (import both from :mod:`medvlm.data.regions`). Coordinates are the image's
original pixels as the data set distributes it, x to the right and y down; a box is
(x0, y0, x1, y1) with x1 = x + w. Findings go through :mod:`medvlm.data.findings` (the packaged table
of each data set's labels, overridable with ``--finding_map``); a label that maps to no finding
is counted and reported, a "no finding" row carries no region and is counted as a negative entry.

Formats and their join keys (the image key each region carries):

====================  =====================================================  ===============================
format                header / layout                                        key; image size the file states
====================  =====================================================  ===============================
``nih_bbox``          ``Image Index,Finding Label,Bbox [x,y,w,h]`` (the box  file stem of Image Index;
                      header is split over four columns), NIH                1024 x 1024 (NIH's PNGs; each
                      BBox_List_2017.csv                                     original size is in Data_Entry)
``vindr``             ``image_id,class_name,rad_id,x_min,y_min,x_max,        image_id (a file stem); not
                      y_max`` (class_id optional), VinDr-CXR; one row per    stated (the DICOM's own size;
                      reader box: a region is the union of every reader's    pass ``stated_sizes``)
                      boxes for (image, finding), reader count recorded
``rsna``              ``patientId,x,y,width,height,Target``, RSNA pneumonia  patientId (a file stem);
                      (Target 0 rows carry no box; label "Lung Opacity")     1024 x 1024
``siim``              ``ImageId,EncodedPixels``, SIIM-ACR pneumothorax:      ImageId (a file stem);
                      Kaggle RLE, -1 = no mask (see :func:`siim_runs`)       1024 x 1024
``chexlocalize``      JSON ``{cxr_id: {pathology: {"size": [h, w],           ``patientP_studyS_viewV_frontal``
                      "counts": COCO RLE}}}`` (gt_segmentations_*.json)      from the image path's last three
                                                                             parts; the mask's "size"
``box_csv``           ``study_id,finding,x,y,w,h`` or ``study_id,finding,    study_id; image_width and
                      x_min,y_min,x_max,y_max``; optional image_path,        image_height when given, else
                      image_width, image_height, reader, source (the         not stated
                      question builder's region file)
====================  =====================================================  ===============================

Masks are rasterised only when asked for (:meth:`Region.mask`): a pixel belongs to a box
when its centre lies inside (a box narrower than a pixel keeps the pixel holding its centre); an
RLE mask is resampled at pixel centres (nearest).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np

from medvlm.data.data import first_non_utf8
from medvlm.data.findings import FindingMap, load_finding_map

Box = tuple[float, float, float, float]

KEY_STEM = "image file stem"
KEY_CHEXLOCALIZE = "CheXlocalize id (patientP_studyS_viewV_frontal from the image path)"
KEY_STUDY = "study_id"
NO_FINDING = "no_finding"
NIH_SIZE = (1024, 1024)
RSNA_SIZE = (1024, 1024)
SIIM_SIZE = (1024, 1024)
_CORNERS = ("x_min", "y_min", "x_max", "y_max")

FORMATS = {
    "nih_bbox": "Image Index,Finding Label,Bbox [x,y,w,h] (NIH ChestX-ray14 BBox_List_2017.csv)",
    "vindr": "image_id,class_name,rad_id,x_min,y_min,x_max,y_max (VinDr-CXR train.csv; class_id optional)",
    "rsna": "patientId,x,y,width,height,Target (RSNA pneumonia stage_2_train_labels.csv)",
    "siim": "ImageId,EncodedPixels (SIIM-ACR pneumothorax train-rle.csv)",
    "chexlocalize": '{cxr_id: {pathology: {"size": [h, w], "counts": ...}}} (CheXlocalize gt_segmentations JSON)',
    "box_csv": "study_id,finding,x,y,w,h or study_id,finding,x_min,y_min,x_max,y_max "
    "[,image_path,image_width,image_height,reader,source]",
}


class RegionError(ValueError):
    """A region file cannot be used: unreadable, unknown format, or (strict) bad lines."""


# ----------------------------------------------------------------------------- regions


@dataclass(frozen=True, eq=False)
class Region:
    """One expert region: every box (or the mask) one file gives for one (image, finding).

    key          the image key it joins by (see key_kind)
    key_kind     KEY_STEM, KEY_CHEXLOCALIZE or KEY_STUDY
    finding      canonical finding (medvlm.data.findings); label: as the file spells it
    boxes        (x0, y0, x1, y1) per box in the file's pixel coordinates; readers: reader id per
                 box ("" where the format names none)
    runs         for RLE masks: (starts, lengths) int64 of the foreground runs over the
                 column-major flattening of the [height, width] mask; None for boxes
    image_size   (width, height) the file states its coordinates refer to, or None
    sources      "file:line" (JSON: "file#cxr_id/pathology") of every entry that made it
    """

    key: str
    key_kind: str
    finding: str
    label: str
    source_format: str
    sources: tuple[str, ...]
    boxes: tuple[Box, ...] = ()
    readers: tuple[str, ...] = ()
    runs: tuple[np.ndarray, np.ndarray] | None = None
    image_size: tuple[int, int] | None = None
    image_path: str | None = None

    @property
    def n_readers(self) -> int | None:
        """Distinct readers who marked it, or None where the format names no readers."""
        named = {r for r in self.readers if r}
        return len(named) if named else None

    @property
    def kind(self) -> str:
        return "mask" if self.runs is not None else "boxes"

    def scaled_boxes(self, sx: float = 1.0, sy: float = 1.0) -> list[Box]:
        return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in self.boxes]

    def mask(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """bool [height, width]: the region on an image of width x height (default: the stated
        size), scaled from the stated size; at scale 1 when the file states no size."""
        if width is None or height is None:
            if self.image_size is None:
                raise ValueError(f"region {self.key}/{self.finding}: the file states no image size; pass one")
            width, height = self.image_size
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width} x {height}")
        if self.runs is not None:
            sw, sh = self.image_size  # type: ignore[misc]
            flat = np.zeros(sw * sh, dtype=bool)
            for s, n in zip(*self.runs, strict=True):
                flat[s : s + n] = True
            full = flat.reshape(sw, sh).T  # column-major: index = x * height + y
            return full if (sw, sh) == (width, height) else resample_mask(full, width, height)
        sx, sy = (1.0, 1.0) if self.image_size is None else (width / self.image_size[0], height / self.image_size[1])
        out = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in self.scaled_boxes(sx, sy):
            c0, c1 = _pixel_span(x0, x1, width)
            r0, r1 = _pixel_span(y0, y1, height)
            out[r0:r1, c0:c1] = True
        return out


def _pixel_span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Pixels whose centre p + 0.5 lies in [lo, hi); the pixel holding the centre if none."""
    a, b = math.ceil(lo - 0.5), math.ceil(hi - 0.5)
    if b <= a:
        a = int(math.floor((lo + hi) / 2))
        b = a + 1
    return max(0, a), min(n, b)


def resample_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """bool [height, width] from bool [H, W]: each pixel takes the source pixel under its centre."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    h, w = m.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    return m[rows][:, cols]


@dataclass
class RegionSet:
    """What one file gave: its regions and everything else, counted.

    negative_entries  rows / masks that carry no region ("No finding", Target 0, -1, empty mask)
    unmapped          {label: entries} whose label maps to no finding (not joinable)
    errors            "file:line: reason" per bad line (the line gave no region)
    """

    path: str
    format: str
    regions: list[Region] = field(default_factory=list)
    entries: int = 0
    negative_entries: int = 0
    unmapped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def findings(self) -> set[str]:
        return {r.finding for r in self.regions}

    def counts(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.format,
            "entries": self.entries,
            "regions": len(self.regions),
            "boxes": sum(len(r.boxes) for r in self.regions),
            "negative_entries": self.negative_entries,
            "unmapped_labels": dict(self.unmapped),
            "bad_lines": len(self.errors),
        }


# ----------------------------------------------------------------------------- reading


@dataclass
class _Acc:
    label: str
    sources: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    runs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    size: tuple[int, int] | None = None
    image_path: str | None = None


class _Builder:
    def __init__(self, path: str, fmt: str, fmap: FindingMap, dataset: str | None, key_kind: str):
        self.set = RegionSet(path, fmt)
        self.fmap, self.dataset, self.key_kind = fmap, dataset, key_kind
        self.acc: dict[tuple[str, str], _Acc] = {}

    def error(self, where: str, reason: str) -> None:
        self.set.errors.append(f"{where}: {reason}")

    def finding(self, label: str, where: str) -> str | None:
        """Canonical finding, or None after counting a negative / unmapped entry."""
        self.set.entries += 1
        finding = self.fmap.canonical_finding(label, self.dataset)
        if finding == NO_FINDING:
            self.set.negative_entries += 1
            return None
        if finding is None:
            self.set.unmapped[label] += 1
            return None
        return finding

    def add(self, key: str, finding: str, label: str, where: str, *, box: Box | None = None, reader: str = "",
            runs: tuple[np.ndarray, np.ndarray] | None = None, size: tuple[int, int] | None = None,
            image_path: str | None = None) -> None:
        acc = self.acc.setdefault((key, finding), _Acc(label))
        if acc.sources and size != acc.size:
            self.error(where, f"image size {_fmt_size(size)} differs from {_fmt_size(acc.size)} on {acc.sources[0]}")
            return
        if acc.sources and image_path != acc.image_path:
            self.error(where, f"image_path {image_path!r} differs from {acc.image_path!r} on {acc.sources[0]}")
            return
        acc.size, acc.image_path = size, image_path
        acc.sources.append(where)
        if box is not None:
            acc.boxes.append(box)
            acc.readers.append(reader)
        if runs is not None:
            acc.runs.append(runs)

    def done(self) -> RegionSet:
        for (key, finding), a in self.acc.items():
            runs = None
            if a.runs:
                starts = np.concatenate([r[0] for r in a.runs])
                lengths = np.concatenate([r[1] for r in a.runs])
                runs = (starts, lengths)
            self.set.regions.append(Region(
                key, self.key_kind, finding, a.label, self.set.format, tuple(a.sources), tuple(a.boxes),
                tuple(a.readers), runs, a.size, a.image_path,
            ))
        return self.set


def _fmt_size(size: tuple[int, int] | None) -> str:
    return "not stated" if size is None else f"{size[0]} x {size[1]}"


def _open_text(path: Path) -> io.TextIOBase:
    """The file's text: .gz decompressed, a .zip's single member, else as is (UTF-8, BOM dropped)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    if name.endswith(".zip"):
        zf = zipfile.ZipFile(path)
        members = [i for i in zf.infolist() if not i.is_dir()]
        if len(members) != 1:
            raise RegionError(f"{path}: a .zip must hold exactly one file, found {len(members)}")
        return io.TextIOWrapper(zf.open(members[0]), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _records(fh) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each non-blank CSV record, header included."""
    reader = csv.reader(fh)
    prev_end = 0
    for values in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if values and any(v.strip() for v in values):
            yield start, values


def _detect(header: list[str]) -> str | None:
    h = [c.strip() for c in header]
    names = set(h)
    if h[:3] == ["Image Index", "Finding Label", "Bbox [x"]:
        return "nih_bbox"
    if {"image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"} <= names:
        return "vindr"
    if {"patientId", "x", "y", "width", "height", "Target"} <= names:
        return "rsna"
    if {"ImageId", "EncodedPixels"} <= names:
        return "siim"
    if {"study_id", "finding"} <= names and (
        {"x", "y", "w", "h"} <= names or {"x_min", "y_min", "x_max", "y_max"} <= names
    ):
        return "box_csv"
    return None


def _unknown_format(path: Path, what: str) -> RegionError:
    known = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    return RegionError(f"{path}: not a known region format ({what}). Known formats: {known}")


def _as_finding_map(finding_map) -> FindingMap:
    if isinstance(finding_map, FindingMap):
        return finding_map
    return load_finding_map(finding_map)


def read_regions(
    path: str | os.PathLike[str],
    finding_map: FindingMap | Mapping[str, str | None] | str | os.PathLike[str] | None = None,
    *,
    stated_sizes: Mapping[str, tuple[int, int]] | None = None,
    strict: bool = False,
) -> RegionSet:
    """Read one region file, its format detected from the header (see the module docstring).

    finding_map   a FindingMap, or overrides for the packaged one (dict {label: finding}, or a
                  CSV label,finding[,dataset] / JSON file: ``--finding_map``); None = packaged
    stated_sizes  {image key: (width, height)} the coordinates refer to, for files that state no
                  size (VinDr-CXR: each DICOM's Columns x Rows); boxes are checked against it
    strict        raise RegionError listing every bad line instead of returning them counted
    Raises RegionError for an unreadable file or an unknown format (the message lists the known ones).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise RegionError(f"{p}: region file not found")
    fmap = _as_finding_map(finding_map)
    try:
        with _open_text(p) as fh:
            head = fh.read(1)
            while head and head.isspace():
                head = fh.read(1)
            if head == "{":
                out = _read_chexlocalize(p, head + fh.read(), fmap)
            else:
                records = _records(_prepend(head, fh))
                first = next(records, None)
                if first is None:
                    raise RegionError(f"{p}: empty file (no header)")
                fmt = _detect(first[1])
                if fmt is None:
                    raise _unknown_format(p, f"header {','.join(first[1])!r}")
                out = _READERS[fmt](p, [c.strip() for c in first[1]], records, fmap, stated_sizes or {})
    except UnicodeDecodeError as e:
        where = _first_non_utf8(p) if not p.name.lower().endswith((".gz", ".zip")) else None
        raise RegionError(f"{p}{where or ''}: cannot read as UTF-8 ({e.reason}); save it as UTF-8") from e
    except (OSError, csv.Error, zipfile.BadZipFile, EOFError) as e:
        raise RegionError(f"{p}: cannot read ({type(e).__name__}: {e})") from e
    if strict and out.errors:
        raise RegionError("\n".join([f"{p}: {len(out.errors)} bad line(s):", *out.errors]))
    return out


def _first_non_utf8(path: Path) -> str | None:
    """':line (byte 0x.. at column c)' of a plain file's first byte that is not UTF-8, or None."""
    where = first_non_utf8(path)
    return None if where is None else f":{where[0]} (byte 0x{where[1]:02x} at column {where[2]})"


def _prepend(first: str, fh) -> Iterator[str]:
    """The text stream as lines again, after one character was read to sniff JSON."""
    rest = fh.readline()
    yield first + rest
    yield from fh


def _number(text: str, name: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} is {text!r}")
    return v


def _check_box(box: Box, size: tuple[int, int] | None) -> Box:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box ({x0:g}, {y0:g})-({x1:g}, {y1:g}) has zero or negative area")
    if size is not None:
        w, h = size
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise ValueError(f"box ({x0:g}, {y0:g})-({x1:g}, {y1:g}) lies outside the {w} x {h} image")
    elif x0 < 0 or y0 < 0:
        raise ValueError(f"box ({x0:g}, {y0:g})-({x1:g}, {y1:g}) has negative coordinates")
    return box


def _columns(header: list[str], names: Sequence[str]) -> list[int]:
    return [header.index(n) for n in names]


def _row(values: list[str], n_header: int, n_used: int) -> list[str]:
    """Fields, allowing trailing empty ones (NIH's data rows are shorter than its header)."""
    if len(values) < n_used:
        raise ValueError(f"has {len(values)} field(s), expected at least {n_used}")
    if len(values) > n_header and any(v.strip() for v in values[n_header:]):
        raise ValueError(f"has {len(values)} field(s), the header has {n_header}")
    return [v.strip() for v in values]


def _read_nih(p, header, records, fmap, sizes) -> RegionSet:
    b = _Builder(str(p), "nih_bbox", fmap, "nih", KEY_STEM)
    for line, values in records:
        where = f"{p}:{line}"
        try:
            v = _row(values, len(header), 6)
            name, label = v[0], v[1]
            if not name:
                raise ValueError("empty Image Index")
            x, y, w, h = (_number(t, n) for t, n in zip(v[2:6], "xywh", strict=True))
            box = _check_box((x, y, x + w, y + h), NIH_SIZE)
        except ValueError as e:
            b.error(where, str(e))
            continue
        finding = b.finding(label, where)
        if finding is not None:
            b.add(PurePath(name).stem, finding, label, where, box=box, size=NIH_SIZE)
    return b.done()


def _read_vindr(p, header, records, fmap, sizes) -> RegionSet:
    b = _Builder(str(p), "vindr", fmap, "vindr", KEY_STEM)
    cols = _columns(header, ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"])
    for line, values in records:
        where = f"{p}:{line}"
        try:
            v = _row(values, len(header), len(header))
            image_id, label, reader, *coords = (v[i] for i in cols)
            if not image_id:
                raise ValueError("empty image_id")
            is_negative = fmap.canonical_finding(label, "vindr") == NO_FINDING
            if is_negative:
                if any(coords):
                    raise ValueError(f"{label!r} row carries a box")
                box = None
            else:
                if not all(coords):
                    raise ValueError(f"{label!r} row has no box")
                size = sizes.get(image_id)
                box = _check_box(tuple(_number(t, n) for t, n in zip(coords, _CORNERS, strict=True)), size)
        except ValueError as e:
            b.error(where, str(e))
            continue
        finding = b.finding(label, where)
        if finding is not None:
            b.add(image_id, finding, label, where, box=box, reader=reader, size=sizes.get(image_id))
    return b.done()


def _read_rsna(p, header, records, fmap, sizes) -> RegionSet:
    b = _Builder(str(p), "rsna", fmap, "rsna", KEY_STEM)
    cols = _columns(header, ["patientId", "x", "y", "width", "height", "Target"])
    for line, values in records:
        where = f"{p}:{line}"
        try:
            v = _row(values, len(header), len(header))
            pid, x, y, w, h, target = (v[i] for i in cols)
            if not pid:
                raise ValueError("empty patientId")
            if target not in ("0", "1"):
                raise ValueError(f"Target {target!r} is not 0 or 1")
            if target == "0":
                if any((x, y, w, h)):
                    raise ValueError("Target 0 row carries a box")
                box = None
            else:
                if not all((x, y, w, h)):
                    raise ValueError("Target 1 row has no box")
                bx, by, bw, bh = (_number(t, n) for t, n in zip((x, y, w, h), ("x", "y", "width", "height"),
                                                                   strict=True))
                box = _check_box((bx, by, bx + bw, by + bh), RSNA_SIZE)
        except ValueError as e:
            b.error(where, str(e))
            continue
        _entry(b, pid, "Lung Opacity", where, box=box, size=RSNA_SIZE) if box is not None else _negative(b)
    return b.done()


def _negative(b) -> None:
    """A row that states the finding is absent on its image: counted, no region."""
    b.set.entries += 1
    b.set.negative_entries += 1


def _entry(b, key: str, label: str, where: str, **region) -> None:
    """A row with a region: its label mapped to a finding (unmapped labels are counted by b)."""
    finding = b.finding(label, where)
    if finding is not None:
        b.add(key, finding, label, where, **region)


def siim_runs(encoded: str, width: int = 1024, height: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (starts, lengths) of the foreground runs of a SIIM-ACR Kaggle RLE string.

    The string is pairs "offset length": each offset counts from the end of the previous run (the
    first from 0), over the column-major flattening of the [height, width] mask (the competition's
    mask_functions.rle2mask: reshape(width, height) then transpose). Verified on torchxrayvision's
    siim-pneumothorax-train-rle.csv.gz (see tests/test_regions.py). ValueError for a malformed string.
    """
    parts = encoded.split()
    if not parts or len(parts) % 2:
        raise ValueError(f"RLE has {len(parts)} numbers; expected offset/length pairs")
    try:
        a = np.array([int(t) for t in parts], dtype=np.int64)
    except ValueError:
        raise ValueError("RLE holds a value that is not an integer") from None
    offsets, lengths = a[0::2], a[1::2]
    if np.any(offsets < 0) or np.any(lengths <= 0):
        raise ValueError("RLE has a negative offset or a non-positive length")
    ends = np.cumsum(offsets + lengths)
    starts = ends - lengths
    if ends[-1] > width * height:
        raise ValueError(f"RLE runs to pixel {int(ends[-1])}, past the {width} x {height} image")
    return starts, lengths


def _read_siim(p, header, records, fmap, sizes) -> RegionSet:
    b = _Builder(str(p), "siim", fmap, "siim", KEY_STEM)
    ci, cr = _columns(header, ["ImageId", "EncodedPixels"])
    for line, values in records:
        where = f"{p}:{line}"
        try:
            v = _row(values, len(header), len(header))
            image_id, rle = v[ci], v[cr]
            if not image_id:
                raise ValueError("empty ImageId")
            runs = None if rle == "-1" else siim_runs(rle, *SIIM_SIZE)
        except ValueError as e:
            b.error(where, str(e))
            continue
        _entry(b, image_id, "Pneumothorax", where, runs=runs, size=SIIM_SIZE) if runs is not None else _negative(b)
    return b.done()


def _read_box_csv(p, header, records, fmap, sizes) -> RegionSet:
    b = _Builder(str(p), "box_csv", fmap, None, KEY_STUDY)
    corners = {"x_min", "y_min", "x_max", "y_max"} <= set(header)
    box_names = ["x_min", "y_min", "x_max", "y_max"] if corners else ["x", "y", "w", "h"]
    cols = _columns(header, ["study_id", "finding", *box_names])
    opt = {n: header.index(n) for n in ("image_path", "image_width", "image_height", "reader") if n in header}
    if ("image_width" in opt) != ("image_height" in opt):
        b.error(f"{p}:1", "image_width and image_height come together (one is missing)")
        return b.done()
    for line, values in records:
        where = f"{p}:{line}"
        try:
            v = _row(values, len(header), len(header))
            study, label, *coords = (v[i] for i in cols)
            if not study:
                raise ValueError("empty study_id")
            if not label:
                raise ValueError("empty finding")
            size = None
            if "image_width" in opt and (v[opt["image_width"]] or v[opt["image_height"]]):
                sw, sh = (_number(v[opt[n]], n) for n in ("image_width", "image_height"))
                if sw <= 0 or sh <= 0 or sw != int(sw) or sh != int(sh):
                    raise ValueError(f"image size {sw:g} x {sh:g} is not two positive integers")
                size = (int(sw), int(sh))
            if not any(coords):
                box = None
            elif not all(coords):
                empty = [n for n, c in zip(box_names, coords, strict=True) if not c]
                raise ValueError(f"box has empty field(s): {', '.join(empty)}")
            else:
                a, c, e, d = (_number(t, n) for t, n in zip(coords, box_names, strict=True))
                box = _check_box((a, c, e, d) if corners else (a, c, a + e, c + d), size)
        except ValueError as e:
            b.error(where, str(e))
            continue
        if box is None:
            b.set.entries += 1
            b.set.negative_entries += 1
            continue
        finding = b.finding(label, where)
        if finding is not None:
            image_path = (v[opt["image_path"]] or None) if "image_path" in opt else None
            reader = v[opt["reader"]] if "reader" in opt else ""
            b.add(study, finding, label, where, box=box, reader=reader, size=size, image_path=image_path)
    return b.done()


def coco_rle_counts(counts: str | Sequence[int]) -> np.ndarray:
    """COCO RLE run lengths (int64; background first, alternating, column-major) from the
    compressed string pycocotools writes (6-bit chunks offset by 48, 5 data bits each, sign in the
    last chunk's bit 0x10, each count after the second stored as the difference to the one two
    before: pycocotools' rleFrString) or from an uncompressed list."""
    if not isinstance(counts, str):
        arr = np.asarray(list(counts), dtype=np.int64)
        if arr.ndim != 1 or np.any(arr < 0):
            raise ValueError("uncompressed RLE counts must be a list of non-negative integers")
        return arr
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("compressed RLE ends inside a number")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE has an invalid character {counts[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    arr = np.asarray(out, dtype=np.int64)
    if np.any(arr < 0):
        raise ValueError("compressed RLE decodes to a negative run length")
    return arr


def coco_runs(counts: str | Sequence[int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the foreground runs of a COCO RLE over a [height, width] mask,
    column-major; ValueError when the counts do not cover height x width pixels exactly."""
    c = coco_rle_counts(counts)
    total = int(c.sum())
    if total != height * width:
        raise ValueError(f"RLE counts cover {total} pixels; size {height} x {width} has {height * width}")
    ends = np.cumsum(c)
    starts = ends - c
    fg = np.arange(c.size) % 2 == 1
    keep = fg & (c > 0)
    return starts[keep], c[keep]


def chexlocalize_key(image_path: str) -> str:
    """CheXlocalize's id of an image path: its last three parts without the extension, joined by
    "_" (".../valid/patient64541/study1/view1_frontal.jpg" -> "patient64541_study1_view1_frontal",
    as their eval code builds it)."""
    parts = PurePath(str(image_path).replace("\\", "/")).parts
    tail = list(parts[-3:])
    if tail:
        tail[-1] = PurePath(tail[-1]).stem
    return "_".join(tail)


def _read_chexlocalize(p: Path, text: str, fmap: FindingMap) -> RegionSet:
    b = _Builder(str(p), "chexlocalize", fmap, "chexpert", KEY_CHEXLOCALIZE)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegionError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise _unknown_format(p, "JSON that is not an object of cxr_id -> pathologies")
    for cxr_id, entry in data.items():
        if not isinstance(entry, dict):
            b.error(f"{p}#{cxr_id}", "is not an object of pathology -> mask")
            continue
        if "img_size" in entry:
            b.error(f"{p}#{cxr_id}", "holds raw polygon annotations (img_size + contours), not RLE masks; "
                    "convert them with CheXlocalize's annotation_to_segmentation.py")
            continue
        for label, rle in entry.items():
            where = f"{p}#{cxr_id}/{label}"
            try:
                if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                    raise ValueError('expected {"size": [h, w], "counts": ...}')
                size = rle["size"]
                if (not isinstance(size, list) or len(size) != 2
                        or not all(isinstance(s, int) and s > 0 for s in size)):
                    raise ValueError(f"size {size!r} is not [height, width]")
                h, w = size
                runs = coco_runs(rle["counts"], h, w)
            except ValueError as e:
                b.error(where, str(e))
                continue
            if runs[0].size == 0:
                b.set.entries += 1
                b.set.negative_entries += 1
                continue
            finding = b.finding(label, where)
            if finding is not None:
                b.add(cxr_id, finding, label, where, runs=runs, size=(w, h))
    return b.done()


_READERS: dict[str, Callable] = {
    "nih_bbox": _read_nih,
    "vindr": _read_vindr,
    "rsna": _read_rsna,
    "siim": _read_siim,
    "box_csv": _read_box_csv,
}
