"""Data loading and validation: the question CSV, study selection and image loading.

CSV schema (canonical, one row per question; header on line 1)::

    study_id     one study = one image; the unit the statistics resample (default cluster)
    image_path   path of the study's image (PNG/JPEG/DICOM); relative paths resolve against
                 ``image_root`` if given, else the CSV's folder; absolute paths are used as is
    finding      what is asked about (e.g. "pleural_effusion")
    variant_id   paraphrase index 0..5; 0 is the original wording
    question     the question text as asked
    answer_gt    ground truth, yes/no (case-insensitive, surrounding blanks ignored)
    subject_id   optional: the patient; ``cluster_by="subject_id"`` resamples patients
    polarity     optional: "direct" or "negated" (case-insensitive; empty = inferred)

The common export scheme is accepted through :class:`ColumnMapping`::

    export column        canonical field
    answer            -> answer_gt
    variant_index     -> variant_id
    question          -> question           (the text that is asked, always)
    baseline_question -> baseline_question  (kept as a reference column, never asked)
    subject_id        -> subject_id
    study_id, image_path, finding keep their names.

``baseline_question`` is the variant-0 wording that each paraphrase was derived from; the
paraphrase actually put to the model is in ``question``. So ``question`` is always the asked
text, ``baseline_question`` is carried along for reference only, and a header that has
``baseline_question`` but no ``question`` is rejected (asking the baseline wording six times
would make every robustness statistic meaningless). Disagreements (variant 0's ``question``
differs from ``baseline_question``; one (study, finding) with several baseline wordings) are
reported as warnings.

Validation (:func:`load_dataset`) reads every row before any model is loaded and reports
every bad row with its CSV line number (header = line 1, so the first data row is line 2;
blank lines and multi-line quoted fields are counted as the file has them) and its reason.
Rows are bad for: a field count that differs from the header; an empty study_id, finding,
question or image_path; a variant that is not an integer in 0-5; an answer that is not
yes/no; a missing or unreadable image; a repeated (study_id, finding, variant_id) (the
second and later occurrences, naming the line of the first); a study whose rows name
different images (every row of that study: one image per study); and, with
``cluster_by="subject_id"``, an empty subject_id or a study that names several subjects.

Negated paraphrases: a paraphrase may be worded the other way round ("Is the pleural space
clear?" for "Is there a pleural effusion?"), so that its correct answer is the opposite of
variant 0's: "negated" (the others "direct"; every good row gets a ``polarity``). Unstated,
a row is negated iff its answer_gt differs from variant 0's; without variant 0, the stated
polarities give variant 0's answer, else every answer_gt must be the same. Bad rows: a polarity
other than direct/negated; variant 0 marked negated; negated with variant 0's answer_gt or
direct with the other (naming variant 0's line); no variant 0 and answer_gt differing with
no (or contradictory) polarities stated (every row of the group). ``notes`` counts negated rows.
A file that cannot be read as CSV, has no data rows, or lacks required columns raises
:class:`DatasetError` naming the file (and the missing columns).

Image readability (checked once per resolved path): DICOM is read in full with pydicom and
its first frame decoded (catches truncated pixel data and missing decoders); PNG is
``verify()``-ed (walks every chunk and checks its CRC, which catches truncation and bit
corruption); JPEG is decoded at reduced scale (``draft``), which runs the whole entropy
decode and so catches truncation; other formats Pillow knows are decoded in full.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd

from medvlm.data.images import ImageLoadError, LoadedImage, check_image, load_image  # noqa: F401 - re-exported

VARIANT_IDS = tuple(range(6))
CLUSTER_CHOICES = ("study_id", "subject_id")
REQUIRED_FIELDS = ("study_id", "image_path", "finding", "variant_id", "question", "answer_gt")
OPTIONAL_FIELDS = ("subject_id", "baseline_question", "polarity")
POLARITIES = ("direct", "negated")

# Accepted CSV column names per canonical field, in order of preference (canonical first).
COLUMN_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "study_id": ("study_id",),
    "image_path": ("image_path",),
    "finding": ("finding",),
    "variant_id": ("variant_id", "variant_index"),
    "question": ("question",),
    "answer_gt": ("answer_gt", "answer"),
    "subject_id": ("subject_id",),
    "baseline_question": ("baseline_question",),
    "polarity": ("polarity",),
})

# Columns of ValidatedDataset.rows, in order (CSV columns outside the mapping follow them).
ROW_COLUMNS = (
    "line",
    "study_id",
    "subject_id",
    "cluster_id",
    "image_path",
    "image_abspath",
    "finding",
    "variant_id",
    "question",
    "answer_gt",
    "polarity",
    "baseline_question",
)

_INT_RE = re.compile(r"[+-]?\d+(\.0*)?")


class DatasetError(ValueError):
    """The question CSV cannot be used: unreadable, missing columns, or (strict) bad rows.

    ``path`` is the CSV, ``bad_rows`` every bad row (empty for file-level errors).
    """

    def __init__(self, message: str, path: Path | str | None = None, bad_rows: Sequence[BadRow] = ()):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.bad_rows = tuple(bad_rows)


@dataclass(frozen=True)
class BadRow:
    """line: CSV line number (header = 1); reason: why (several joined by '; ');
    study_id: the row's study id if it had one."""

    line: int
    reason: str
    study_id: str | None = None

    def format(self, path: Path | str) -> str:
        return f"{path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class ColumnMapping:
    """Which CSV column feeds each canonical field.

    Every field names a CSV column; ``subject_id``, ``baseline_question`` and ``polarity``
    may be None (absent). ``scheme`` is a label recorded with results: "canonical", "export" or
    "custom". Build one with :meth:`canonical`, :meth:`export`, :meth:`from_columns`
    (detects the scheme from a header), or directly for any other naming.
    """

    study_id: str = "study_id"
    image_path: str = "image_path"
    finding: str = "finding"
    variant_id: str = "variant_id"
    question: str = "question"
    answer_gt: str = "answer_gt"
    subject_id: str | None = None
    baseline_question: str | None = None
    polarity: str | None = None
    scheme: str = "custom"

    @classmethod
    def canonical(cls, subject_id: bool = False, baseline_question: bool = False) -> ColumnMapping:
        return cls(
            subject_id="subject_id" if subject_id else None,
            baseline_question="baseline_question" if baseline_question else None,
            scheme="canonical",
        )

    @classmethod
    def export(cls, subject_id: bool = True, baseline_question: bool = True) -> ColumnMapping:
        """The common export: answer / variant_index / question (+ baseline_question, subject_id)."""
        return cls(
            variant_id="variant_index",
            answer_gt="answer",
            subject_id="subject_id" if subject_id else None,
            baseline_question="baseline_question" if baseline_question else None,
            scheme="export",
        )

    @classmethod
    def from_columns(cls, header: Iterable[str]) -> ColumnMapping:
        """Detect the mapping from a CSV header (names compared after stripping blanks).

        For each field the first present name of ``COLUMN_ALIASES[field]`` is used, so a
        canonical column wins over its export alias. The scheme is "canonical" when every
        used name is the canonical one, else "export". Raises ValueError listing every
        required field that has no column.
        """
        names = {str(h).strip() for h in header}
        chosen: dict[str, str | None] = {}
        missing: list[str] = []
        for fld, aliases in COLUMN_ALIASES.items():
            hit = next((a for a in aliases if a in names), None)
            chosen[fld] = hit
            if hit is None and fld in REQUIRED_FIELDS:
                missing.append(fld)
        if missing:
            parts = []
            for fld in missing:
                accepted = " or ".join(COLUMN_ALIASES[fld])
                if fld == "question" and "baseline_question" in names:
                    accepted += (
                        " (baseline_question is the variant-0 wording, not the asked paraphrase, "
                        "so it cannot stand in for question)"
                    )
                parts.append(accepted)
            raise ValueError("missing required column(s): " + "; ".join(parts))
        canonical = all(v is None or v == COLUMN_ALIASES[k][0] for k, v in chosen.items())
        scheme = "canonical" if canonical else "export"
        return cls(**chosen, scheme=scheme)  # type: ignore[arg-type]

    def columns(self) -> dict[str, str]:
        """{canonical field: CSV column} for every mapped field."""
        out = {}
        for f in fields(self):
            if f.name == "scheme":
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    def missing_from(self, header: Iterable[str]) -> list[str]:
        """The CSV columns this mapping needs that ``header`` lacks."""
        names = {str(h).strip() for h in header}
        return [col for col in self.columns().values() if col not in names]


@dataclass(frozen=True)
class ValidatedDataset:
    """The outcome of :func:`load_dataset`.

    rows        good rows only, in file order, columns ``ROW_COLUMNS`` (+ unmapped CSV
                columns): line (int), study_id, subject_id (None when not mapped),
                cluster_id (study_id or subject_id per ``cluster_by``), image_path (as
                written), image_abspath (resolved, absolute), finding, variant_id (int 0-5),
                question, answer_gt ("yes"/"no"), polarity ("direct"/"negated", given or
                inferred; see the module docstring), baseline_question (None when not mapped)
    bad_rows    every bad row (one entry per line, reasons joined by '; '), by line
    source      the CSV's absolute path
    mapping     the ColumnMapping used
    cluster_by  "study_id" or "subject_id"
    image_root  the folder relative image paths were resolved against
    n_rows_read data rows in the file (good + bad)
    warnings    non-fatal observations (incomplete paraphrase sets, baseline_question
                mismatches, skipped blank lines)
    notes       neutral facts for the log and manifest (how many rows are negated paraphrases)
    """

    rows: pd.DataFrame
    bad_rows: tuple[BadRow, ...]
    source: Path
    mapping: ColumnMapping
    cluster_by: str
    image_root: Path
    n_rows_read: int
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.bad_rows

    @property
    def n_negated(self) -> int:
        """Good rows whose polarity is "negated"."""
        return int((self.rows["polarity"] == "negated").sum()) if len(self.rows) else 0

    @property
    def study_ids(self) -> tuple[str, ...]:
        """Good studies in file order."""
        return tuple(pd.unique(self.rows["study_id"])) if len(self.rows) else ()

    @property
    def n_studies(self) -> int:
        return len(self.study_ids)

    def error_report(self) -> str:
        """One 'file:line: reason' line per bad row."""
        return "\n".join(b.format(self.source) for b in self.bad_rows)

    def raise_if_bad(self) -> None:
        if self.bad_rows:
            raise DatasetError(_strict_message(self.source, self.bad_rows, self.n_rows_read),
                               self.source, self.bad_rows)


@dataclass(frozen=True)
class StudySelection:
    """The outcome of :func:`select_studies`.

    rows       the rows of the selected studies, in file order
    study_ids  the selected studies, in file order
    mode       "all", "first" or "sample"
    requested  the N asked for (None for "all")
    available  how many studies there were
    seed       the seed used for "sample", else None
    warning    set when more studies were asked for than exist (all are then used)
    """

    rows: pd.DataFrame
    study_ids: tuple[str, ...]
    mode: str
    requested: int | None
    available: int
    seed: int | None = None
    warning: str | None = None


# --------------------------------------------------------------------------- CSV reading


def _strict_message(path: Path, bad_rows: Sequence[BadRow], n_rows: int) -> str:
    head = f"{path}: {len(bad_rows)} of {n_rows} data row(s) are bad:"
    return "\n".join([head, *(b.format(path) for b in bad_rows)])


def first_non_utf8(path: Path) -> tuple[int, int, int] | None:
    """(line, byte value, column), 1-based, of the first byte of a plain file that is not UTF-8;
    None when every line decodes. For messages: the decoder's own position counts from the
    start of a read chunk, not the file."""
    for number, raw in enumerate(Path(path).read_bytes().splitlines(keepends=True), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return number, raw[e.start], e.start + 1
    return None


def _not_utf8(path: Path, error: UnicodeDecodeError) -> str:
    """The message for a CSV that is not UTF-8, naming the line and column of its first bad byte."""
    where = first_non_utf8(path)
    if where is None:
        return f"{path}: cannot read as a UTF-8 CSV file ({error})"
    line, byte, column = where
    return f"{path}:{line}: cannot read as a UTF-8 CSV file (byte 0x{byte:02x} at column {column}); save it as UTF-8"


def _read_records(path: Path) -> tuple[list[str], int, list[tuple[int, list[str]]], int]:
    """(header, header line, [(line, fields)], blank lines skipped). Lines are 1-based."""
    header: list[str] | None = None
    header_line = 0
    records: list[tuple[int, list[str]]] = []
    blank = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            prev_end = 0
            for values in reader:
                start = prev_end + 1
                prev_end = reader.line_num
                if not values or all(not v.strip() for v in values):
                    if header is not None:
                        blank += 1
                    continue
                if header is None:
                    header, header_line = values, start
                else:
                    records.append((start, values))
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: CSV file not found", path) from e
    except IsADirectoryError as e:
        raise DatasetError(f"{path}: is a directory, not a CSV file", path) from e
    except UnicodeDecodeError as e:
        raise DatasetError(_not_utf8(path, e), path) from e
    except csv.Error as e:
        raise DatasetError(f"{path}: cannot parse as CSV ({e})", path) from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})", path) from e
    if header is None:
        raise DatasetError(f"{path}: empty file (no header row)", path)
    return [h.strip() for h in header], header_line, records, blank


def _parse_variant(text: str) -> int | None:
    if not _INT_RE.fullmatch(text):
        return None
    return int(float(text))


def _fmt_lines(lines: Sequence[int], limit: int = 6) -> str:
    """[2,3,4,7] -> 'lines 2-4, 7' (at most ``limit`` runs, then '...')."""
    lines = sorted(lines)
    runs: list[tuple[int, int]] = []
    for n in lines:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    if len(runs) > limit:
        parts.append("...")
    word = "line" if len(lines) == 1 else "lines"
    return f"{word} {', '.join(parts)}"


def resolve_image_path(image_path: str, image_root: Path) -> Path:
    """Absolute, normalised path: absolute paths as is (after ~ expansion), else under image_root."""
    p = Path(image_path).expanduser()
    if not p.is_absolute():
        p = image_root / p
    return Path(os.path.normpath(os.path.abspath(p)))


def load_dataset(
    csv_path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    mapping: ColumnMapping | None = None,
    cluster_by: str = "study_id",
    strict: bool = False,
    check_images: bool = True,
) -> ValidatedDataset:
    """Read and validate the question CSV (see the module docstring for every rule).

    mapping       None: detect from the header (:meth:`ColumnMapping.from_columns`)
    cluster_by    "study_id" (default) or "subject_id" (the mapping must have subject_id)
    strict        raise :class:`DatasetError` listing every bad row as 'file:line: reason'
    check_images  check that each image exists and is readable (once per path)

    Raises DatasetError for a file that cannot be read, has no data rows or lacks columns,
    and ValueError for a bad ``cluster_by``.
    """
    if cluster_by not in CLUSTER_CHOICES:
        raise ValueError(f"cluster_by must be one of {CLUSTER_CHOICES}, got {cluster_by!r}")
    path = Path(os.path.abspath(Path(csv_path).expanduser()))
    root = Path(os.path.abspath(Path(image_root).expanduser())) if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise DatasetError(f"{path}: image_root {root} is not a directory", path)

    header, header_line, records, blank = _read_records(path)
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DatasetError(
            f"{path}:{header_line}: duplicate column name(s) in header: {', '.join(dupes)}", path
        )
    if mapping is None:
        try:
            mapping = ColumnMapping.from_columns(header)
        except ValueError as e:
            sep = next((s for s in (";", "\t", "|") if len(header) == 1 and s in header[0]), None)
            name = "tab" if sep == "\t" else repr(sep)
            hint = f" (the file looks {name}-separated: save it comma-separated)" if sep else ""
            raise DatasetError(f"{path}:{header_line}: {e}; header has: {', '.join(header)}{hint}", path) from e
    else:
        missing = mapping.missing_from(header)
        if missing:
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)} required by the column mapping; "
                f"header has: {', '.join(header)}",
                path,
            )
    if cluster_by == "subject_id" and mapping.subject_id is None:
        raise DatasetError(f"{path}: cluster_by='subject_id' but the CSV has no subject_id column", path)
    if not records:
        raise DatasetError(f"{path}: header but no data rows", path)

    cols = mapping.columns()
    index = {h: i for i, h in enumerate(header)}
    extra_cols = [h for h in header if h not in cols.values() and h not in ROW_COLUMNS]

    problems: dict[int, list[str]] = {}
    parsed: dict[int, dict] = {}
    image_status: dict[Path, str | None] = {}

    def flag(line: int, reason: str) -> None:
        problems.setdefault(line, []).append(reason)

    for line, values in records:
        if len(values) != len(header):
            flag(line, f"has {len(values)} field(s), the header has {len(header)}")
            parsed[line] = {}
            continue
        raw = {fld: values[index[col]].strip() for fld, col in cols.items()}
        row: dict = {"line": line}
        for fld in ("study_id", "finding", "question", "image_path"):
            row[fld] = raw[fld]
            if not raw[fld]:
                flag(line, f"empty {cols[fld]}")
        row["subject_id"] = raw.get("subject_id")
        row["baseline_question"] = raw.get("baseline_question")
        row["given_polarity"] = raw.get("polarity", "").lower() or None
        if row["given_polarity"] not in (None, *POLARITIES):
            flag(line, f"{cols['polarity']} {raw['polarity']!r} is not direct/negated (or empty)")
            row["given_polarity"] = None
        if cluster_by == "subject_id" and not raw["subject_id"]:
            flag(line, f"empty {cols['subject_id']} (needed for cluster_by='subject_id')")

        variant = _parse_variant(raw["variant_id"])
        if variant is None:
            flag(line, f"{cols['variant_id']} {raw['variant_id']!r} is not an integer")
        elif variant not in VARIANT_IDS:
            flag(line, f"{cols['variant_id']} {variant} is outside 0-5")
            variant = None
        row["variant_id"] = variant

        answer = raw["answer_gt"].lower()
        if answer not in ("yes", "no"):
            flag(line, f"{cols['answer_gt']} {raw['answer_gt']!r} is not yes/no")
        row["answer_gt"] = answer

        row["image_abspath"] = None
        if raw["image_path"]:
            abspath = resolve_image_path(raw["image_path"], root)
            row["image_abspath"] = abspath
            if check_images:
                if abspath not in image_status:
                    image_status[abspath] = _image_problem(abspath)
                if image_status[abspath] is not None:
                    flag(line, image_status[abspath])
        for col in extra_cols:
            row[col] = values[index[col]]
        parsed[line] = row

    # (study_id, finding, variant_id) must be unique: later occurrences name the first.
    first_seen: dict[tuple[str, str, int], int] = {}
    for line, row in parsed.items():
        if not row or not row["study_id"] or not row["finding"] or row["variant_id"] is None:
            continue
        key = (row["study_id"], row["finding"], row["variant_id"])
        if key in first_seen:
            flag(line, f"duplicate of line {first_seen[key]} (study_id {key[0]!r}, finding {key[1]!r}, "
                       f"variant {key[2]})")
        else:
            first_seen[key] = line

    _resolve_polarity(parsed, first_seen, flag)

    # One image (and, when clustering by patient, one subject) per study.
    by_study: dict[str, list[dict]] = {}
    for row in parsed.values():
        if row and row["study_id"]:
            by_study.setdefault(row["study_id"], []).append(row)
    warnings: list[str] = []
    for study, rows_ in by_study.items():
        images: dict[Path, list[int]] = {}
        for r in rows_:
            if r["image_abspath"] is not None:
                images.setdefault(r["image_abspath"], []).append(r["line"])
        if len(images) > 1:
            desc = "; ".join(f"{p} ({_fmt_lines(ls)})" for p, ls in images.items())
            for r in rows_:
                flag(r["line"], f"study {study!r} names {len(images)} different images (one image per "
                                f"study): {desc}")
        if mapping.subject_id is not None:
            subjects: dict[str, list[int]] = {}
            for r in rows_:
                if r["subject_id"]:
                    subjects.setdefault(r["subject_id"], []).append(r["line"])
            if len(subjects) > 1:
                desc = "; ".join(f"{s!r} ({_fmt_lines(ls)})" for s, ls in subjects.items())
                msg = f"study {study!r} names {len(subjects)} different subjects: {desc}"
                if cluster_by == "subject_id":
                    for r in rows_:
                        flag(r["line"], msg)
                else:
                    warnings.append(f"{path}: {msg}")

    bad_rows = tuple(
        BadRow(line, "; ".join(reasons), (parsed.get(line) or {}).get("study_id") or None)
        for line, reasons in sorted(problems.items())
    )
    n_rows = len(records)
    if strict and bad_rows:
        raise DatasetError(_strict_message(path, bad_rows, n_rows), path, bad_rows)

    good = [row for line, row in parsed.items() if line not in problems]
    for row in good:
        del row["given_polarity"]
        row["cluster_id"] = row["study_id"] if cluster_by == "study_id" else row["subject_id"]
        row["image_abspath"] = str(row["image_abspath"])
    frame = pd.DataFrame(good, columns=[*ROW_COLUMNS, *extra_cols])
    frame = frame.astype({"line": "int64", "variant_id": "int64"})
    for col in ("subject_id", "baseline_question"):
        if frame[col].isna().all():
            frame[col] = pd.Series([None] * len(frame), index=frame.index, dtype="object")

    if blank:
        warnings.append(f"{path}: skipped {blank} blank line(s)")
    warnings.extend(_group_warnings(path, frame))
    n_negated = int((frame["polarity"] == "negated").sum())
    notes = (
        (f"{path}: {n_negated} of {len(frame)} good rows are negated paraphrases (answer_gt opposite to "
         f"variant 0's): each row's own answer_gt decides correctness; robustness compares answers in "
         f"variant 0's terms",)
        if n_negated else ()
    )
    return ValidatedDataset(
        rows=frame.reset_index(drop=True),
        bad_rows=bad_rows,
        source=path,
        mapping=mapping,
        cluster_by=cluster_by,
        image_root=root,
        n_rows_read=n_rows,
        warnings=tuple(warnings),
        notes=notes,
    )


def _resolve_polarity(parsed: dict[int, dict], first_seen: dict[tuple[str, str, int], int], flag) -> None:
    """Set row["polarity"] ("direct"/"negated", None where unknown) on every parsed row and flag
    the rows whose polarity cannot hold (module docstring). first_seen: (study, finding,
    variant) -> line of its first row; flag(line, reason) records a bad row."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in parsed.values():
        if row:
            row["polarity"] = None
            if row["study_id"] and row["finding"] and row["variant_id"] is not None and row["answer_gt"] in _OPPOSITE:
                groups.setdefault((row["study_id"], row["finding"]), []).append(row)
    for (study, finding), rows in groups.items():
        v0 = parsed.get(first_seen.get((study, finding, 0), -1))
        if v0 is not None and v0["given_polarity"] == "negated":
            flag(v0["line"], "variant 0 is the original wording and cannot have polarity negated")
        if v0 is not None and v0["answer_gt"] in _OPPOSITE:
            ref = v0["answer_gt"]
        else:  # no usable variant 0: the stated polarities say what its answer is, else all direct
            stated = {r["answer_gt"] if r["given_polarity"] == "direct" else _OPPOSITE[r["answer_gt"]]
                      for r in rows if r["given_polarity"]}
            answers = {r["answer_gt"] for r in rows}
            if len(stated) > 1 or (not stated and len(answers) > 1):
                why = ("the stated polarities imply both yes and no for it" if stated else
                       "answer_gt differs between its paraphrases with no polarity to say which are negated")
                for r in rows:
                    flag(r["line"], f"study {study!r} finding {finding!r} has no variant 0 and {why}")
                continue
            ref = next(iter(stated or answers))
        for r in rows:
            r["polarity"] = "direct" if r["answer_gt"] == ref else "negated"
            if r["given_polarity"] not in (None, r["polarity"]) and r is not v0:
                assert v0 is not None, "stated polarities without variant 0 agree with ref by construction"
                verb = "equals" if r["given_polarity"] == "negated" else "differs from"
                flag(r["line"], f"polarity {r['given_polarity']} but answer_gt {r['answer_gt']!r} {verb} "
                                f"variant 0's ({ref!r}, line {v0['line']})")


_OPPOSITE = {"yes": "no", "no": "yes"}


def _group_warnings(path: Path, frame: pd.DataFrame) -> list[str]:
    """Non-fatal checks per (study, finding) over the good rows."""
    out: list[str] = []
    if frame.empty:
        return out
    for (study, finding), g in frame.groupby(["study_id", "finding"], sort=False):
        where = f"{path}: study {study!r} finding {finding!r} ({_fmt_lines(g['line'].tolist())})"
        have = set(g["variant_id"].tolist())
        missing = [v for v in VARIANT_IDS if v not in have]
        if missing:
            out.append(f"{where}: missing variant(s) {', '.join(map(str, missing))}")
        base = g["baseline_question"].dropna()
        base = base[base != ""]
        if len(base):
            if base.nunique() > 1:
                out.append(f"{where}: {base.nunique()} different baseline_question texts")
            v0 = g[g["variant_id"] == 0]
            for _, r in v0.iterrows():
                if r["baseline_question"] and r["question"] != r["baseline_question"]:
                    out.append(f"{path}:{r['line']}: variant 0 question differs from baseline_question")
    return out


# --------------------------------------------------------------------------- selection


def select_studies(
    rows: pd.DataFrame | ValidatedDataset,
    n_studies: int | None = None,
    sample: int | None = None,
    seed: int | None = None,
) -> StudySelection:
    """Pick the studies to run.

    n_studies  the first N studies in file order
    sample     N studies drawn at random without replacement with ``seed`` (required)
    neither    every study

    The two are mutually exclusive (ValueError). N must be a positive integer. When N
    exceeds the number of studies, every study is used and ``warning`` says so (the run
    goes on with what exists rather than failing; the warning is for the manifest/log).
    Selected studies keep file order in both modes.
    """
    frame = rows.rows if isinstance(rows, ValidatedDataset) else rows
    if "study_id" not in frame.columns:
        raise ValueError("select_studies needs a 'study_id' column")
    if n_studies is not None and sample is not None:
        raise ValueError(f"n_studies ({n_studies}) and sample ({sample}) are mutually exclusive; give one")
    studies = tuple(pd.unique(frame["study_id"]))
    available = len(studies)
    if n_studies is None and sample is None:
        return StudySelection(frame.copy(), studies, "all", None, available)

    mode = "first" if n_studies is not None else "sample"
    n = n_studies if n_studies is not None else sample
    name = "n_studies" if mode == "first" else "sample"
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    n = int(n)
    if mode == "sample":
        if seed is None:
            raise ValueError("sample needs a seed so that the selection can be reproduced")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    warning = None
    if n >= available:
        if n > available:
            warning = f"{name}={n} but only {available} studies are available: using all {available}"
        chosen = studies
    elif mode == "first":
        chosen = studies[:n]
    else:
        rng = np.random.default_rng(int(seed))  # type: ignore[arg-type]
        picked = sorted(rng.choice(available, size=n, replace=False).tolist())
        chosen = tuple(studies[i] for i in picked)
    keep = set(chosen)
    subset = frame[frame["study_id"].isin(keep)].copy()
    return StudySelection(subset, tuple(chosen), mode, n, available,
                          int(seed) if mode == "sample" else None, warning)


def _image_problem(path: Path) -> str | None:
    """None if the image exists and can be read, else the reason (naming the file)."""
    if not path.exists():
        return f"image not found: {path}"
    try:
        check_image(path)
    except ImageLoadError as e:
        return f"unreadable image: {e}"
    return None
