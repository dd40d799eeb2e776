"""Expert regions joined to the question rows, in the images' pixels as they are on disk.

Read region files with :func:`read_regions` (formats and their image keys: :mod:`medvlm.data.region_formats`),
then :func:`join_regions` attaches each region to the question rows whose image it names and whose
finding is the region's canonical finding (:mod:`medvlm.data.findings`, overridable: ``--finding_map``):

- NIH (Image Index), VinDr-CXR (image_id), RSNA (patientId) and SIIM (ImageId) name the image file's
  stem: the question's image_path without folder and extension;
- CheXlocalize names ``patientP_studyS_viewV_frontal``, built from the image path's last three parts;
- the plain box CSV names the study_id (its optional image_path must then be the question's image).

When the image on disk has another size than the file states but the same aspect ratio (each side
within one pixel of the scaled size), the region is scaled and the factor recorded (NIH's boxes are
for its 1024 x 1024 PNGs; many work from 512 x 512 copies); another aspect ratio is an error for that
region. When the file states no size (VinDr-CXR), the region is taken at scale 1 and its boxes must
lie within the image on disk. Everything that does not join is counted in the :class:`JoinReport`:
regions whose image is not in the questions or whose finding is not asked for it, positive questions
of a finding the file has regions for but none for their image, and per-line errors.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np

from medvlm.data.findings import FindingMap
from medvlm.data.region_formats import (
    FORMATS,
    KEY_CHEXLOCALIZE,
    KEY_STEM,
    KEY_STUDY,
    Box,
    Region,
    RegionError,
    RegionSet,
    _as_finding_map,
    chexlocalize_key,
    coco_rle_counts,
    coco_runs,
    read_regions,
    resample_mask,
    siim_runs,
)

MAX_EXAMPLES = 20

__all__ = [
    "FORMATS",
    "Box",
    "JoinReport",
    "JoinedRegion",
    "Region",
    "RegionError",
    "RegionSet",
    "chexlocalize_key",
    "coco_rle_counts",
    "coco_runs",
    "join_regions",
    "read_regions",
    "resample_mask",
    "siim_runs",
]


@dataclass(frozen=True, eq=False)
class JoinedRegion:
    """A region on one question image: image_size (width, height) on disk, scale (sx, sy) from
    the file's coordinates to it (1, 1 when the file states no size)."""

    region: Region
    study_id: str
    image_path: str
    image_size: tuple[int, int]
    scale: tuple[float, float]

    @property
    def finding(self) -> str:
        return self.region.finding

    def mask(self) -> np.ndarray:
        """bool [height, width] on the image as it is on disk (rasterised now, not kept)."""
        return self.region.mask(*self.image_size)

    def boxes(self) -> list[Box]:
        """The boxes in the on-disk image's pixels (empty for a mask region)."""
        return self.region.scaled_boxes(*self.scale)

    def describe(self) -> dict[str, object]:
        """What results rows should carry about the region."""
        r = self.region
        sx, sy = self.scale
        return {
            "region_format": r.source_format,
            "region_source": r.sources[0] + (f" (+{len(r.sources) - 1})" if len(r.sources) > 1 else ""),
            "region_label": r.label,
            "region_kind": r.kind,
            "region_boxes": len(r.boxes),
            "region_readers": r.n_readers,
            "region_scale": sx if sx == sy else f"{sx:g} x {sy:g}",
            "region_size_stated": r.image_size is not None,
        }


@dataclass
class JoinReport:
    """Counts of a join, for the manifest and the report; every region or positive question that
    did not join is counted here with its reason, and examples are kept (MAX_EXAMPLES per kind)."""

    files: list[dict[str, object]] = field(default_factory=list)
    question_rows: int = 0
    regions_joined: int = 0
    rows_joined: int = 0
    groups_joined: int = 0
    regions_unmatched: Counter = field(default_factory=Counter)
    unmatched_examples: list[str] = field(default_factory=list)
    positives_without_region: int = 0
    positive_rows_without_region: int = 0
    positives_without_region_by_finding: Counter = field(default_factory=Counter)
    positives_without_region_examples: list[str] = field(default_factory=list)
    negative_questions_with_region: int = 0
    scaled: Counter = field(default_factory=Counter)
    size_not_stated: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "question_rows": self.question_rows,
            "regions_joined": self.regions_joined,
            "rows_joined": self.rows_joined,
            "question_groups_joined": self.groups_joined,
            "regions_unmatched": dict(self.regions_unmatched),
            "unmatched_examples": self.unmatched_examples,
            "positive_questions_without_region": self.positives_without_region,
            "positive_rows_without_region": self.positive_rows_without_region,
            "positives_without_region_by_finding": dict(self.positives_without_region_by_finding),
            "positives_without_region_examples": self.positives_without_region_examples,
            "negative_questions_with_region": self.negative_questions_with_region,
            "regions_scaled": {str(k): v for k, v in self.scaled.items()},
            "regions_size_not_stated": self.size_not_stated,
            "errors": len(self.errors),
            "error_lines": self.errors,
        }

    def summary(self) -> list[str]:
        """Readable lines: what joined, what did not and why."""
        out = []
        for f in self.files:
            out.append(
                f"{f['path']} ({f['format']}): {f['regions']} region(s) from {f['entries']} entries, "
                f"{f['negative_entries']} without a region, {sum(f['unmapped_labels'].values())} with an unmapped "
                f"label, {f['bad_lines']} bad line(s)"
            )
        out.append(
            f"joined {self.regions_joined} region(s) to {self.groups_joined} question group(s) "
            f"({self.rows_joined} of {self.question_rows} rows)"
        )
        for reason, n in sorted(self.regions_unmatched.items()):
            out.append(f"not joined: {n} region(s): {reason}")
        if self.positives_without_region:
            by = ", ".join(f"{k} {v}" for k, v in sorted(self.positives_without_region_by_finding.items()))
            out.append(
                f"{self.positives_without_region} positive question group(s) ({self.positive_rows_without_region} "
                f"rows) of a finding the file has regions for have none for their image ({by})"
            )
        if self.negative_questions_with_region:
            out.append(f"{self.negative_questions_with_region} question group(s) answered 'no' have a region")
        for factor, n in sorted(self.scaled.items(), key=str):
            out.append(f"{n} region(s) scaled by {factor} to the image on disk")
        if self.size_not_stated:
            out.append(f"{self.size_not_stated} joined region(s) from a file that states no image size (scale 1)")
        if self.errors:
            out.append(f"{len(self.errors)} error(s):")
            out.extend(f"  {e}" for e in self.errors)
        return out


def _scale(stated: tuple[int, int], disk: tuple[int, int]) -> tuple[float, float] | None:
    """(sx, sy) when disk is stated resized with the same aspect ratio (each side rounded to
    within one pixel), else None."""
    sw, sh = stated
    w, h = disk
    if (sw, sh) == (w, h):
        return 1.0, 1.0
    lo = max((w - 1) / sw, (h - 1) / sh)
    hi = min((w + 1) / sw, (h + 1) / sh)
    return (w / sw, h / sh) if lo <= hi else None


def _where(r: Region) -> str:
    more = len(r.sources) - 1
    return r.sources[0] + (f" (and {more} more line(s) of this region)" if more else "")


def _stem(path: str) -> str:
    return PurePath(str(path).replace("\\", "/")).stem


def join_regions(
    region_sets: RegionSet | Sequence[RegionSet],
    rows,
    image_sizes: Mapping[str, tuple[int, int]] | Callable[[str], tuple[int, int] | None],
    finding_map: FindingMap | Mapping[str, str | None] | str | os.PathLike[str] | None = None,
) -> tuple[dict[object, tuple[JoinedRegion, ...]], JoinReport]:
    """Attach regions to question rows.

    region_sets  one or more read_regions results (one per ``--regions`` file)
    rows         pandas DataFrame with columns study_id, image_path, finding, answer_gt (one row
                 per question; image_path as in the question CSV)
    image_sizes  (width, height) of each image on disk, by the rows' image_path (a mapping, or a
                 function returning None when unknown); asked only for images that regions name
    finding_map  as for read_regions; the rows' findings are canonicalised through it (a finding it
                 does not know is compared as written)

    Returns ({row index label: (JoinedRegion, ...)} for every row that has a region, JoinReport).
    A region joins the rows whose image it names (see the module docstring for each format's key)
    and whose canonical finding is the region's. Not joined, counted by reason: its image is not in
    the questions, or the finding is not asked for it. Errors (in report.errors, "file:line: ..."):
    the key names several question images, the image's size is unknown, another aspect ratio than
    the file states, a box outside an image whose size the file does not state, an image_path that
    disagrees with the question's.
    """
    sets = [region_sets] if isinstance(region_sets, RegionSet) else list(region_sets)
    missing = [c for c in ("study_id", "image_path", "finding", "answer_gt") if c not in rows.columns]
    if missing:
        raise ValueError(f"question rows lack column(s) {', '.join(missing)}")
    fmap = _as_finding_map(finding_map)
    size_of = image_sizes if callable(image_sizes) else image_sizes.get
    report = JoinReport(files=[s.counts() for s in sets], question_rows=len(rows))
    for s in sets:
        report.errors.extend(s.errors)

    canon: dict[str, str] = {}
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    positive: dict[tuple[str, str, str], int] = Counter()
    index: dict[str, dict[str, set[tuple[str, str]]]] = {k: defaultdict(set) for k in
                                                         (KEY_STEM, KEY_CHEXLOCALIZE, KEY_STUDY)}
    for label, study, path, finding, answer in zip(
        rows.index, rows["study_id"].astype(str), rows["image_path"].astype(str), rows["finding"].astype(str),
        rows["answer_gt"].astype(str), strict=True,
    ):
        if finding not in canon:
            canon[finding] = fmap.canonical_finding(finding) or finding
        g = (study, path, canon[finding])
        groups[g].append(label)
        positive[g] += answer.strip().lower() == "yes"
        index[KEY_STEM][_stem(path)].add((study, path))
        index[KEY_CHEXLOCALIZE][chexlocalize_key(path)].add((study, path))
        index[KEY_STUDY][study].add((study, path))

    def unmatched(reason: str, r: Region) -> None:
        report.regions_unmatched[reason] += 1
        if len(report.unmatched_examples) < MAX_EXAMPLES:
            report.unmatched_examples.append(f"{_where(r)}: {r.key} / {r.finding}: {reason}")

    joined: dict[tuple[str, str, str], list[JoinedRegion]] = defaultdict(list)
    sizes: dict[str, tuple[int, int] | None] = {}
    per_set: list[tuple[set, set]] = []  # (groups joined, groups whose region had an error)
    for s in sets:
        ok_groups: set = set()
        bad_groups: set = set()
        per_set.append((ok_groups, bad_groups))
        for r in s.regions:
            images = index[r.key_kind].get(r.key)
            if not images:
                unmatched("image not in the questions", r)
                continue
            if len(images) > 1:
                names = ", ".join(sorted(f"{st} ({p})" for st, p in images)[:4])
                report.errors.append(f"{_where(r)}: {r.key_kind} {r.key!r} names {len(images)} question images "
                                     f"({names}); not joined")
                continue
            study, path = next(iter(images))
            g = (study, path, r.finding)
            if g not in groups:
                unmatched("finding not asked for this image", r)
                continue
            if path not in sizes:
                size = size_of(path)
                sizes[path] = None if size is None else (int(size[0]), int(size[1]))
            disk = sizes[path]
            problem = None
            if disk is None:
                problem = f"size of image {path} unknown"
            elif r.image_path is not None and _stem(r.image_path) != _stem(path):
                problem = f"image_path {r.image_path!r} is not the question's image {path!r}"
            elif r.image_size is not None:
                scale = _scale(r.image_size, disk)
                if scale is None:
                    problem = (f"image {path} is {disk[0]} x {disk[1]} on disk, the file's coordinates are for "
                               f"{r.image_size[0]} x {r.image_size[1]}: a different aspect ratio")
            else:
                scale = (1.0, 1.0)
                far = [b for b in r.boxes if b[2] > disk[0] or b[3] > disk[1]]
                if far:
                    x0, y0, x1, y1 = far[0]
                    problem = (f"box ({x0:g}, {y0:g})-({x1:g}, {y1:g}) lies outside image {path} "
                               f"({disk[0]} x {disk[1]} on disk; the file states no image size)")
            if problem is not None:
                report.errors.append(f"{_where(r)}: {problem}")
                bad_groups.add(g)
                continue
            joined[g].append(JoinedRegion(r, study, path, disk, scale))
            ok_groups.add(g)
            report.regions_joined += 1
            if r.image_size is None:
                report.size_not_stated += 1
            elif scale != (1.0, 1.0):
                key = f"{scale[0]:.4g}" if abs(scale[0] - scale[1]) < 1e-9 else f"{scale[0]:.4g} x {scale[1]:.4g}"
                report.scaled[key] += 1

    by_row: dict[object, tuple[JoinedRegion, ...]] = {}
    for g, regions in joined.items():
        report.groups_joined += 1
        report.rows_joined += len(groups[g])
        if positive[g] == 0:
            report.negative_questions_with_region += 1
        for label in groups[g]:
            by_row[label] = tuple(regions)

    for s, (ok_groups, bad_groups), info in zip(sets, per_set, report.files, strict=True):
        findings = s.findings
        n_groups = n_rows = 0
        for g in groups:
            if positive[g] and g[2] in findings and g not in ok_groups and g not in bad_groups:
                n_groups += 1
                n_rows += positive[g]
                report.positives_without_region_by_finding[g[2]] += 1
                if len(report.positives_without_region_examples) < MAX_EXAMPLES:
                    report.positives_without_region_examples.append(f"{s.path}: study {g[0]} ({g[1]}) / {g[2]}")
        info["positives_without_region"] = n_groups
        report.positives_without_region += n_groups
        report.positive_rows_without_region += n_rows
    return by_row, report
