"""Tests for medvlm.data.data: CSV validation, column mapping, study selection, image loading."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medvlm.data import data
from medvlm.data.data import (
    ColumnMapping,
    DatasetError,
    ImageLoadError,
    check_image,
    load_dataset,
    load_image,
    select_studies,
)
from medvlm.data.demo_data import pydicom_data_file

CANON = ["study_id", "image_path", "finding", "variant_id", "question", "answer_gt"]


# --------------------------------------------------------------------------- helpers


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def png(path: Path, value: int = 100, size: tuple[int, int] = (8, 6)) -> Path:
    Image.new("L", size, value).save(path)
    return path


def six(study: str, image: str, finding: str = "effusion", answer: str = "yes") -> list[list[object]]:
    return [[study, image, finding, v, f"{finding} q{v}?", answer] for v in range(6)]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    good = png(tmp_path / "a.png", 50)
    other = png(tmp_path / "b.png", 150)
    buf = (tmp_path / "a.png").read_bytes()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(buf[: len(buf) // 2])
    return {"good": good, "other": other, "corrupt": corrupt}


# --------------------------------------------------------------------------- validation


def bad_file(tmp_path: Path) -> Path:
    """Every kind of bad row, with known line numbers (header = line 1)."""
    p = tmp_path / "q.csv"
    lines = [
        ",".join(CANON),                                      # 1 header
        "s1,a.png,eff,0,Is there an effusion?,yes",          # 2 good
        "s1,a.png,eff,1,Any effusion?, YES ",                 # 3 good, answer normalised
        "s1,a.png,eff,6,q?,yes",                              # 4 variant outside 0-5
        "s1,a.png,eff,x,q?,yes",                              # 5 variant not an integer
        "s6,a.png,eff,2,q?,maybe",                            # 6 answer not yes/no
        "s1,a.png,eff,3,   ,no",                              # 7 empty question
        ",a.png,eff,0,q?,no",                                 # 8 empty study_id
        "s1,a.png,,0,q?,no",                                  # 9 empty finding
        "s2,missing.png,eff,0,q?,no",                         # 10 image not found
        "s3,corrupt.png,eff,0,q?,no",                         # 11 unreadable image
        "s1,a.png,eff,0,Again?,yes",                          # 12 duplicate of line 2
        "s4,a.png,eff,0,q?,no",                               # 13 study with two images
        "s4,b.png,eff,1,q?,no",                               # 14 (both rows bad)
        "s5,a.png,eff,0,q?",                                  # 15 wrong field count
        "s1,a.png,eff,2.0,q2?,No",                            # 16 good (2.0 is an integer)
        's1,a.png,eff,4,"Is there',                           # 17 good, multi-line question
        'an effusion?",no',                                   # 18
        "",                                                   # 19 blank line
        "s1,a.png,eff,9,q?,no",                               # 20 variant outside 0-5
        "s1,a.png,eff,5,q5?,yes",                             # 21 good
    ]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


EXPECTED_BAD = {
    4: "variant_id 6 is outside 0-5",
    5: "variant_id 'x' is not an integer",
    6: "answer_gt 'maybe' is not yes/no",
    7: "empty question",
    8: "empty study_id",
    9: "empty finding",
    10: "image not found",
    11: "unreadable image",
    12: "duplicate of line 2",
    13: "names 2 different images",
    14: "names 2 different images",
    15: "has 5 field(s), the header has 6",
    20: "variant_id 9 is outside 0-5",
}


def test_every_bad_row_reported_with_line_and_reason(tmp_path, images):
    ds = load_dataset(bad_file(tmp_path))
    got = {b.line: b.reason for b in ds.bad_rows}
    assert sorted(got) == sorted(EXPECTED_BAD)
    for line, fragment in EXPECTED_BAD.items():
        assert fragment in got[line], (line, got[line])
    assert "missing.png" in got[10] and "corrupt.png" in got[11]
    assert "a.png" in got[13] and "b.png" in got[13]
    assert {b.line: b.study_id for b in ds.bad_rows}[10] == "s2"
    assert {b.line: b.study_id for b in ds.bad_rows}[8] is None
    assert ds.n_rows_read == 18  # lines 17-18 are one record, line 19 is blank
    assert not ds.ok


def test_non_strict_keeps_good_rows_in_canonical_form(tmp_path, images):
    ds = load_dataset(bad_file(tmp_path))
    rows = ds.rows
    assert rows["line"].tolist() == [2, 3, 16, 17, 21]
    assert list(rows.columns[: len(data.ROW_COLUMNS)]) == list(data.ROW_COLUMNS)
    assert rows["answer_gt"].tolist() == ["yes", "yes", "no", "no", "yes"]
    assert rows["variant_id"].tolist() == [0, 1, 2, 4, 5]
    assert rows["variant_id"].dtype == np.int64
    assert rows.loc[rows["line"] == 17, "question"].item() == "Is there\nan effusion?"
    assert set(rows["image_abspath"]) == {str(images["good"].resolve())}
    assert rows["cluster_id"].tolist() == rows["study_id"].tolist()
    assert ds.study_ids == ("s1",)
    assert any("missing variant(s) 3" in w for w in ds.warnings)
    assert any("blank line" in w for w in ds.warnings)


def test_strict_raises_listing_every_bad_row(tmp_path, images):
    path = bad_file(tmp_path)
    with pytest.raises(DatasetError) as exc:
        load_dataset(path, strict=True)
    msg = str(exc.value)
    for line in EXPECTED_BAD:
        assert f"{path}:{line}: " in msg
    assert f"{len(EXPECTED_BAD)} of 18 data row(s) are bad" in msg
    assert len(exc.value.bad_rows) == len(EXPECTED_BAD)
    assert isinstance(exc.value, ValueError)
    # raise_if_bad on a non-strict result says the same
    with pytest.raises(DatasetError, match=r"q\.csv:4: variant_id 6"):
        load_dataset(path).raise_if_bad()


def test_clean_file_strict_ok(tmp_path, images):
    p = write_csv(tmp_path / "q.csv", CANON, six("s1", "a.png") + six("s2", "b.png", answer="no"))
    ds = load_dataset(p, strict=True)
    assert ds.ok and ds.n_studies == 2 and len(ds.rows) == 12
    assert ds.warnings == ()
    assert ds.mapping.scheme == "canonical"
    assert ds.rows["subject_id"].isna().all() and ds.rows["baseline_question"].isna().all()


def test_each_image_checked_once(tmp_path, images, monkeypatch):
    calls: list[Path] = []
    real = data.check_image

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(data, "check_image", counting)
    p = write_csv(tmp_path / "q.csv", CANON, six("s1", "a.png") + six("s2", "./b.png") + six("s3", "b.png"))
    load_dataset(p, strict=True)
    assert sorted(c.name for c in calls) == ["a.png", "b.png"]


def test_check_images_off_skips_file_checks(tmp_path):
    p = write_csv(tmp_path / "q.csv", CANON, six("s1", "nowhere.png"))
    assert load_dataset(p, check_images=False, strict=True).ok
    with pytest.raises(DatasetError, match="image not found"):
        load_dataset(p, strict=True)


def test_image_root_and_absolute_paths(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    png(root / "x.png")
    elsewhere = png(tmp_path / "abs.png")
    csv_dir = tmp_path / "csvs"
    csv_dir.mkdir()
    p = write_csv(csv_dir / "q.csv", CANON, six("s1", "x.png") + six("s2", str(elsewhere)))
    ds = load_dataset(p, image_root=root, strict=True)
    assert ds.image_root == root
    assert ds.rows.groupby("study_id")["image_abspath"].first().to_dict() == {
        "s1": str(root / "x.png"), "s2": str(elsewhere)}
    # without image_root, relative paths resolve against the CSV's folder
    assert "image not found" in load_dataset(p).bad_rows[0].reason
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(p, image_root=tmp_path / "nope")


def test_missing_columns_is_a_file_level_error(tmp_path):
    p = write_csv(tmp_path / "q.csv", ["study_id", "image_path", "finding", "question"], [["s", "a", "f", "q"]])
    with pytest.raises(DatasetError) as exc:
        load_dataset(p)
    msg = str(exc.value)
    assert str(p) in msg and "variant_id or variant_index" in msg and "answer_gt or answer" in msg
    assert exc.value.bad_rows == ()
    semi = tmp_path / "semi.csv"
    semi.write_text("study_id;image_path;finding;variant_id;question;answer_gt\ns;a;f;0;q;yes\n")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(semi))}:1: missing required column.*looks ';'-separated"):
        load_dataset(semi)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty file"),
        (b"study_id,image_path,finding,variant_id,question,answer_gt\n", "no data rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\xfa binary", "cannot"),
        (b"study_id,study_id,finding,variant_id,question,answer_gt\n1,2,3,4,5,6\n", "duplicate column"),
    ],
)
def test_unreadable_csv(tmp_path, content, fragment):
    p = tmp_path / "bad.csv"
    p.write_bytes(content)
    with pytest.raises(DatasetError, match=fragment) as exc:
        load_dataset(p)
    assert str(p) in str(exc.value)


def test_non_utf8_csv_names_the_line_of_the_first_bad_byte(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("study_id,image_path,finding,variant_id,question,answer_gt\n"
                  "s1,a.png,effusion,0,Is there an effusion?,yes\n"
                  "s1,a.png,effusion,1,Y a-t-il un épanchement?,yes\n".encode("latin-1"))  # fmt: skip
    expected = rf"^{re.escape(str(p))}:3: cannot read as a UTF-8 CSV file \(byte 0xe9 at column 33\)"
    with pytest.raises(DatasetError, match=expected):
        load_dataset(p)


def test_missing_csv_and_bad_cluster_by(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="cluster_by"):
        load_dataset(tmp_path / "none.csv", cluster_by="patient")


# --------------------------------------------------------------------------- column mapping

EXPORT = ["study_id", "subject_id", "image_path", "finding", "variant_index", "baseline_question",
          "question", "answer"]


def export_rows(study, subject, image, finding="eff", answer="Yes"):
    base = f"Is there {finding}?"
    return [[study, subject, image, finding, v, base, base if v == 0 else f"{finding} paraphrase {v}?", answer]
            for v in range(6)]


def test_from_columns_detects_schemes():
    assert ColumnMapping.from_columns(CANON) == ColumnMapping.canonical()
    m = ColumnMapping.from_columns(EXPORT)
    assert m == ColumnMapping.export()
    assert (m.variant_id, m.answer_gt, m.question, m.baseline_question, m.subject_id, m.scheme) == (
        "variant_index", "answer", "question", "baseline_question", "subject_id", "export")
    # canonical names win over export aliases
    both = ColumnMapping.from_columns([*CANON, "answer", "variant_index"])
    assert (both.answer_gt, both.variant_id, both.scheme) == ("answer_gt", "variant_id", "canonical")
    with pytest.raises(ValueError, match="baseline_question is the variant-0 wording"):
        ColumnMapping.from_columns([c for c in EXPORT if c != "question"])


def test_export_scheme_loads(tmp_path, images):
    p = write_csv(tmp_path / "export.csv", EXPORT,
                  export_rows("s1", "p1", "a.png") + export_rows("s2", "p1", "b.png", answer="NO"))
    ds = load_dataset(p, strict=True)
    assert ds.mapping.scheme == "export"
    r = ds.rows
    assert r["answer_gt"].tolist() == ["yes"] * 6 + ["no"] * 6
    assert r["variant_id"].tolist() == list(range(6)) * 2
    # the asked text is `question`; baseline_question is carried for reference
    assert r.loc[1, "question"] == "eff paraphrase 1?"
    assert r.loc[1, "baseline_question"] == "Is there eff?"
    assert r["subject_id"].tolist() == ["p1"] * 12
    assert ds.warnings == ()


def test_export_errors_name_export_columns_and_warn_on_baseline_mismatch(tmp_path, images):
    rows = export_rows("s1", "p1", "a.png")
    rows[0][6] = "A different variant-0 wording?"
    rows[2][4] = 7
    ds = load_dataset(write_csv(tmp_path / "e.csv", EXPORT, rows))
    assert [(b.line, b.reason) for b in ds.bad_rows] == [(4, "variant_index 7 is outside 0-5")]
    assert any(":2: variant 0 question differs from baseline_question" in w for w in ds.warnings)


def test_explicit_mapping(tmp_path, images):
    header = ["sid", "img", "label", "v", "text", "truth"]
    p = write_csv(tmp_path / "c.csv", header, six("s1", "a.png"))
    m = ColumnMapping(study_id="sid", image_path="img", finding="label", variant_id="v", question="text",
                      answer_gt="truth")
    ds = load_dataset(p, mapping=m, strict=True)
    assert ds.mapping is m and len(ds.rows) == 6 and ds.rows["study_id"].iloc[0] == "s1"
    with pytest.raises(DatasetError, match="missing column.*subject"):
        load_dataset(p, mapping=ColumnMapping(study_id="sid", image_path="img", finding="label",
                                              variant_id="v", question="text", answer_gt="truth",
                                              subject_id="subject"))


def test_extra_columns_are_carried(tmp_path, images):
    rows = [[*r, "PA"] for r in six("s1", "a.png")]
    ds = load_dataset(write_csv(tmp_path / "q.csv", [*CANON, "view"], rows), strict=True)
    assert ds.rows["view"].tolist() == ["PA"] * 6


# --------------------------------------------------------------------------- clustering


def test_cluster_by_subject(tmp_path, images):
    rows = export_rows("s1", "p1", "a.png") + export_rows("s2", "p1", "b.png") + export_rows("s3", "p2", "a.png")
    p = write_csv(tmp_path / "e.csv", EXPORT, rows)
    by_subject = load_dataset(p, cluster_by="subject_id", strict=True)
    assert by_subject.cluster_by == "subject_id"
    assert by_subject.rows.groupby("study_id")["cluster_id"].first().to_dict() == {
        "s1": "p1", "s2": "p1", "s3": "p2"}
    by_study = load_dataset(p)
    assert by_study.rows["cluster_id"].tolist() == by_study.rows["study_id"].tolist()


def test_cluster_by_subject_needs_the_column_and_values(tmp_path, images):
    p = write_csv(tmp_path / "q.csv", CANON, six("s1", "a.png"))
    with pytest.raises(DatasetError, match="no subject_id column"):
        load_dataset(p, cluster_by="subject_id")
    rows = export_rows("s1", "", "a.png") + export_rows("s2", "p1", "b.png")
    rows[7][1] = "p2"  # study s2 now names two subjects
    p2 = write_csv(tmp_path / "e.csv", EXPORT, rows)
    ds = load_dataset(p2, cluster_by="subject_id")
    reasons = {b.line: b.reason for b in ds.bad_rows}
    assert all("empty subject_id" in reasons[line] for line in range(2, 8))
    assert all("2 different subjects" in reasons[line] for line in range(8, 14))
    # clustering by study, a study with two subjects is only a warning
    ds_study = load_dataset(p2)
    assert ds_study.ok and any("2 different subjects" in w for w in ds_study.warnings)


# --------------------------------------------------------------------------- negated paraphrases


def test_negated_paraphrase_validates_and_gets_polarity(tmp_path, images):
    rows = six("s1", "a.png") + six("s2", "b.png", answer="no")
    rows[3][5] = "no"  # s1 variant 3, e.g. "Is the pleural space clear?"
    rows[10][5] = "yes"  # s2 variant 4
    ds = load_dataset(write_csv(tmp_path / "q.csv", CANON, rows), strict=True)
    assert ds.rows["polarity"].tolist() == ["direct"] * 3 + ["negated"] + ["direct"] * 6 + ["negated", "direct"]
    assert ds.n_negated == 2 and ds.warnings == ()
    assert len(ds.notes) == 1 and "2 of 12 good rows are negated paraphrases" in ds.notes[0]
    assert list(ds.rows.columns[: len(data.ROW_COLUMNS)]) == list(data.ROW_COLUMNS)
    # the same stated in a polarity column (any case; empty = inferred)
    stated = [[*r, {3: " Negated", 10: "NEGATED"}.get(i, "direct" if i % 2 else "")] for i, r in enumerate(rows)]
    ds2 = load_dataset(write_csv(tmp_path / "p.csv", [*CANON, "polarity"], stated), strict=True)
    assert ds2.mapping.polarity == "polarity" and ds2.mapping.scheme == "canonical"
    assert ds2.rows["polarity"].tolist() == ds.rows["polarity"].tolist()
    assert load_dataset(write_csv(tmp_path / "c.csv", CANON, six("s1", "a.png")), strict=True).notes == ()


def test_stated_polarity_that_contradicts_answer_gt_is_a_bad_row(tmp_path, images):
    rows = [[*r, ""] for r in six("s1", "a.png")]
    rows[2][6] = "negated"  # line 4: answer yes, as variant 0's
    rows[3][5], rows[3][6] = "no", "direct"  # line 5: answer no, unlike variant 0's
    rows[4][6] = "backwards"  # line 6
    ds = load_dataset(write_csv(tmp_path / "q.csv", [*CANON, "polarity"], rows))
    got = {b.line: b.reason for b in ds.bad_rows}
    assert got == {
        4: "polarity negated but answer_gt 'yes' equals variant 0's ('yes', line 2)",
        5: "polarity direct but answer_gt 'no' differs from variant 0's ('yes', line 2)",
        6: "polarity 'backwards' is not direct/negated (or empty)",
    }
    assert ds.rows["line"].tolist() == [2, 3, 7]


def test_variant_0_marked_negated_is_a_bad_row(tmp_path, images):
    rows = [[*r, "negated" if r[3] == 0 else ""] for r in six("s1", "a.png")]
    ds = load_dataset(write_csv(tmp_path / "q.csv", [*CANON, "polarity"], rows))
    assert [(b.line, b.reason) for b in ds.bad_rows] == [
        (2, "variant 0 is the original wording and cannot have polarity negated")
    ]


def test_group_without_variant_0_needs_polarity_when_answers_differ(tmp_path, images):
    rows = six("s1", "a.png")[1:] + six("s2", "b.png")[1:]  # no variant 0
    rows[2][5] = "no"  # s1 variant 3
    ds = load_dataset(write_csv(tmp_path / "q.csv", CANON, rows))
    assert [b.line for b in ds.bad_rows] == [2, 3, 4, 5, 6]  # all of s1 effusion
    assert "study 's1' finding 'effusion' has no variant 0 and answer_gt differs" in ds.bad_rows[0].reason
    assert ds.rows["polarity"].tolist() == ["direct"] * 5  # s2: all answers equal, all direct
    stated = [[*r, "negated" if i == 2 else ""] for i, r in enumerate(rows)]
    ds2 = load_dataset(write_csv(tmp_path / "p.csv", [*CANON, "polarity"], stated), strict=True)
    assert ds2.rows["polarity"].tolist() == ["direct", "direct", "negated"] + ["direct"] * 7
    both = [[*r, {2: "negated", 3: "negated"}.get(i, "")] for i, r in enumerate(rows)]  # imply yes and no
    ds3 = load_dataset(write_csv(tmp_path / "b.csv", [*CANON, "polarity"], both))
    assert [b.line for b in ds3.bad_rows] == [2, 3, 4, 5, 6]
    assert "the stated polarities imply both yes and no" in ds3.bad_rows[0].reason


# --------------------------------------------------------------------------- selection


@pytest.fixture
def ten_studies(tmp_path, images):
    rows = []
    for i in range(10):
        rows += six(f"s{i}", "a.png")[:2]
    return load_dataset(write_csv(tmp_path / "q.csv", CANON, rows), strict=True)


def test_select_first_n_and_all(ten_studies):
    sel = select_studies(ten_studies.rows, n_studies=3)
    assert sel.study_ids == ("s0", "s1", "s2") and sel.mode == "first" and sel.warning is None
    assert len(sel.rows) == 6 and sel.available == 10
    everything = select_studies(ten_studies)
    assert everything.mode == "all" and len(everything.study_ids) == 10


def test_select_sample_is_seeded_and_in_file_order(ten_studies):
    a = select_studies(ten_studies.rows, sample=4, seed=7)
    b = select_studies(ten_studies.rows, sample=4, seed=7)
    c = select_studies(ten_studies.rows, sample=4, seed=8)
    assert a.study_ids == b.study_ids and a.seed == 7 and a.mode == "sample"
    assert len(set(a.study_ids)) == 4
    order = [f"s{i}" for i in range(10)]
    assert list(a.study_ids) == sorted(a.study_ids, key=order.index)
    assert a.study_ids != c.study_ids or a.study_ids != select_studies(ten_studies, sample=4, seed=9).study_ids
    assert set(a.rows["study_id"]) == set(a.study_ids)


def test_select_more_than_available_uses_all_with_warning(ten_studies):
    for kwargs in ({"n_studies": 25}, {"sample": 25, "seed": 0}):
        sel = select_studies(ten_studies.rows, **kwargs)
        assert len(sel.study_ids) == 10
        assert "25" in sel.warning and "10" in sel.warning


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_studies": 2, "sample": 2, "seed": 0}, "mutually exclusive"),
        ({"n_studies": 0}, "positive integer"),
        ({"n_studies": 2.5}, "positive integer"),
        ({"n_studies": True}, "positive integer"),
        ({"sample": 2}, "seed"),
        ({"sample": 2, "seed": -1}, "seed"),
    ],
)
def test_select_bad_arguments(ten_studies, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        select_studies(ten_studies.rows, **kwargs)


# --------------------------------------------------------------------------- images: PNG/JPEG


def test_png_8bit_grayscale(tmp_path):
    arr = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(arr).save(tmp_path / "g.png")
    li = load_image(tmp_path / "g.png")
    assert li.image.mode == "RGB" and li.original_size == (8, 6) and li.source_kind == "png"
    out = np.asarray(li.image)
    assert np.array_equal(out[..., 0], arr) and np.array_equal(out[..., 2], arr)


def test_png_16bit_min_max_not_truncated(tmp_path):
    arr = np.linspace(1000, 3000, 64 * 4).astype(np.uint16).reshape(4, 64)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    li = load_image(tmp_path / "g16.png")
    out = np.asarray(li.image)[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    expected = np.round((arr.astype(float) - 1000) / 2000 * 255)
    assert np.abs(out - expected).max() <= 1
    assert any("min-max" in n and "1000" in n and "3000" in n for n in li.notes)


def test_jpeg_and_rgba(tmp_path):
    Image.new("RGB", (20, 10), (200, 30, 30)).save(tmp_path / "c.jpg", quality=95)
    li = load_image(tmp_path / "c.jpg")
    assert li.source_kind == "jpeg" and li.image.size == (20, 10)
    assert np.asarray(li.image)[5, 10, 0] > 150
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(tmp_path / "a.png")
    li2 = load_image(tmp_path / "a.png")
    assert li2.image.mode == "RGB" and "alpha channel dropped" in li2.notes


def test_unreadable_images_fail_and_name_the_file(tmp_path):
    jpg = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(jpg)
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(jpg.read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for bad in (truncated, text, tmp_path / "absent.png"):
        with pytest.raises(ImageLoadError, match=bad.name):
            check_image(bad)
        with pytest.raises(ImageLoadError, match=bad.name):
            load_image(bad)
    assert check_image(jpg) == "jpeg"
    folder = tmp_path / "scan.png"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match=r"scan\.png: is a directory, not an image file"):
        check_image(folder)
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"zero\.png: empty file \(0 bytes\)"):
        check_image(tmp_path / "zero.png")


# --------------------------------------------------------------------------- images: DICOM


def test_real_chest_cr_loads_sensibly():
    path = pydicom_data_file("RG1_UNCI.dcm")
    li = load_image(path)
    assert li.source_kind == "dicom" and li.image.mode == "RGB"
    assert li.original_size == (1841, 1955)
    g = np.asarray(li.image)[..., 0].astype(float)
    assert len(np.unique(g)) > 100 and g.std() > 10
    assert "MONOCHROME1 inverted (dense = bright)" in li.notes
    assert any(n.startswith("VOI LUT applied (window center 15000, width 30000") for n in li.notes)
    # polarity: at mid height the mediastinum/spine (centre) is brighter than both lungs
    h, w = g.shape
    band = g[int(0.4 * h): int(0.55 * h)]
    centre = band[:, int(0.47 * w): int(0.53 * w)].mean()
    lungs = (band[:, int(0.22 * w): int(0.32 * w)].mean(), band[:, int(0.68 * w): int(0.78 * w)].mean())
    assert centre > max(lungs) + 10


def test_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))  # 0..990
    p1 = write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1")
    p2 = write_dicom(tmp_path / "m2.dcm", ramp, photometric="MONOCHROME2")
    g1 = np.asarray(load_image(p1).image)[..., 0].astype(int)
    g2 = np.asarray(load_image(p2).image)[..., 0].astype(int)
    assert g2[0, 0] == 0 and g2[0, -1] == 255  # min-max of the actual range (no VOI tags)
    assert g1[0, 0] == 255 and g1[0, -1] == 0
    assert np.array_equal(g1, 255 - g2)
    notes = load_image(p1).notes
    assert "MONOCHROME1 inverted (dense = bright)" in notes
    assert any("min-max of the actual range [0, 990]" in n for n in notes)


def test_window_center_width(tmp_path):
    values = np.array([[0, 75, 76, 100, 124, 125, 200, 4095]], dtype=np.uint16)
    p = write_dicom(tmp_path / "w.dcm", values, WindowCenter=100, WindowWidth=50)
    li = load_image(p)
    out = np.asarray(li.image)[0, :, 0].astype(int)
    # DICOM LINEAR: c' = 99.5, w' = 49; x <= 75 -> 0, x > 124 -> max, else ((x - c')/w' + .5)
    expected = [0, 0, round(((76 - 99.5) / 49 + 0.5) * 255), round((0.5 / 49 + 0.5) * 255), 255, 255, 255, 255]
    assert np.abs(out - np.array(expected)).max() <= 1
    assert "VOI LUT applied (window center 100, width 50)" in li.notes


def test_rescale_then_window_in_hounsfield_units(tmp_path):
    stored = np.array([[0, 1024, 1074, 1124, 2048]], dtype=np.uint16)  # HU -1024, 0, 50, 100, 1024
    p = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                    WindowCenter=50, WindowWidth=101)
    li = load_image(p)
    out = np.asarray(li.image)[0, :, 0].astype(int)
    # LINEAR with c' = 49.5, w' = 100: HU 0 -> (-.495 + .5) * 255 = 1.3, HU 50 -> 128.8
    assert out[0] == 0 and out[1] == 1 and out[2] == 129 and out[3] == 255 and out[4] == 255
    assert "modality rescale applied (slope 1, intercept -1024)" in li.notes


def test_multiframe_takes_first_frame(tmp_path):
    frames = np.stack([np.tile(np.arange(16, dtype=np.uint16), (4, 1)),
                       np.tile(np.arange(16, dtype=np.uint16)[::-1], (4, 1))])
    li = load_image(write_dicom(tmp_path / "mf.dcm", frames))
    g = np.asarray(li.image)[..., 0]
    assert g[0, 0] == 0 and g[0, -1] == 255
    assert "multi-frame (2 frames): first frame used" in li.notes


def test_real_dicom_variety():
    ct = load_image(pydicom_data_file("693_UNCI.dcm"))
    assert any("intercept -1024" in n for n in ct.notes)
    us = load_image(pydicom_data_file("US1_UNCI.dcm"))
    assert us.image.size == (640, 480) and us.notes == ()
    mr = load_image(pydicom_data_file("emri_small.dcm"))
    assert "multi-frame (10 frames): first frame used" in mr.notes


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_corrupt_dicom_fails_validation(tmp_path):
    good = write_dicom(tmp_path / "ok.dcm", np.zeros((64, 64), dtype=np.uint16) + 7)
    truncated = tmp_path / "trunc.dcm"
    truncated.write_bytes(good.read_bytes()[:-2000])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    for bad in (truncated, garbage):
        with pytest.raises(ImageLoadError, match=bad.name):
            load_image(bad)
    rows = six("s1", "ok.dcm") + six("s2", "trunc.dcm") + six("s3", "garbage.dcm")
    ds = load_dataset(write_csv(tmp_path / "q.csv", CANON, rows))
    assert sorted({b.study_id for b in ds.bad_rows}) == ["s2", "s3"]
    assert all("unreadable image" in b.reason for b in ds.bad_rows)
    assert ds.study_ids == ("s1",)
    # constant image: no VOI tags, min-max over a zero range gives a black image
    assert np.asarray(load_image(good).image).max() == 0


def test_dicom_header_written_by_helper_round_trips(tmp_path):
    p = write_dicom(tmp_path / "h.dcm", np.zeros((2, 2), dtype=np.uint16), PhotometricInterpretation="MONOCHROME1")
    assert pydicom.dcmread(p).PhotometricInterpretation == "MONOCHROME1"


def test_bom_padded_header_and_all_bad_rows(tmp_path, images):
    p = tmp_path / "bom.csv"
    p.write_text("\ufeff study_id , image_path,finding,variant_id,question,answer_gt\n"
                 "s1,a.png,eff,0,q?,yes\n", encoding="utf-8")
    assert load_dataset(p, strict=True).rows["study_id"].tolist() == ["s1"]
    p.write_text(",".join(CANON) + "\ns1,a.png,eff,9,q?,yes\n", encoding="utf-8")
    ds = load_dataset(p)
    assert ds.rows.empty and ds.n_studies == 0 and [b.line for b in ds.bad_rows] == [2]
    assert "only 0 studies" in select_studies(ds, n_studies=1).warning
