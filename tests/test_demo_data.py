"""Tests for medvlm.demo_data: a demo CSV from pydicom-data whose labels come from DICOM headers."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from medvlm.data import load_dataset, load_image
from medvlm.demo_data import (
    DEMO_FINDINGS,
    DEMO_LABELS_NAME,
    DEMO_STUDIES,
    DemoStudy,
    build_demo_dataset,
    pydicom_data_file,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    csv_path = build_demo_dataset(out)
    labels = json.loads((out / DEMO_LABELS_NAME).read_text())
    return csv_path, labels, load_dataset(csv_path, strict=True)


def test_demo_validates_clean(demo):
    csv_path, _, ds = demo
    assert ds.ok and ds.warnings == ()
    assert 5 <= ds.n_studies <= 8
    assert ds.mapping.scheme == "canonical"
    assert {"RG1_UNCI", "RG3_UNCI"} <= set(ds.study_ids)
    assert all(p.startswith("/") and p.endswith(".dcm") for p in ds.rows["image_abspath"])


def test_six_variants_per_finding_with_one_answer(demo):
    _, _, ds = demo
    by_name = {f.name: f for f in DEMO_FINDINGS}
    for (_, finding), g in ds.rows.groupby(["study_id", "finding"]):
        assert sorted(g["variant_id"]) == list(range(6))
        assert g["answer_gt"].nunique() == 1
        assert g.sort_values("variant_id")["question"].tolist() == list(by_name[finding].questions)
    for f in DEMO_FINDINGS:
        assert len(set(f.questions)) == 6


def test_labels_match_the_dicom_headers(demo):
    _, labels, ds = demo
    by_name = {f.name: f for f in DEMO_FINDINGS}
    csv_answers = ds.rows.groupby(["study_id", "finding"])["answer_gt"].first().to_dict()
    assert len(labels["studies"]) == ds.n_studies
    for study in labels["studies"]:
        header = pydicom.dcmread(study["image_path"], stop_before_pixels=True)
        asked = set()
        for label in study["labels"]:
            value = str(header.get(label["tag"])).strip()
            assert label["tag_value"] == value
            assert label["answer_gt"] == by_name[label["finding"]].answer(value)
            assert csv_answers[(study["study_id"], label["finding"])] == label["answer_gt"]
            asked.add(label["finding"])
        for skip in study["skipped"]:
            assert skip["finding"] not in asked
            value = header.get(skip["tag"])
            assert value is None or not str(value).strip() or by_name[skip["finding"]].answer(str(value)) is None
        assert asked | {s["finding"] for s in study["skipped"]} == set(by_name)
        assert {f for (s, f) in csv_answers if s == study["study_id"]} == asked


def test_known_answers(demo):
    _, labels, ds = demo
    ans = ds.rows.groupby(["study_id", "finding"])["answer_gt"].first().to_dict()
    assert ans[("RG1_UNCI", "modality_cr")] == "yes"
    assert ans[("RG1_UNCI", "body_part_chest")] == "yes"
    assert ans[("RG1_UNCI", "view_pa")] == "yes"
    assert ans[("RG1_UNCI", "modality_ct")] == "no"
    assert ans[("RG3_UNCI", "modality_cr")] == "yes"
    assert ans[("RG3_UNCI", "body_part_chest")] == "no"  # BodyPartExamined EXTREMITY
    assert ans[("RG3_UNCI", "view_pa")] == "no"  # ViewPosition AP
    assert ans[("693_UNCI", "modality_ct")] == "yes"
    # absent tag (CT has no BodyPartExamined) and an undecided value (NM "WHOLE BODY"): no label
    assert ("693_UNCI", "body_part_chest") not in ans
    assert ("NM_JPEG2000_UNC", "body_part_chest") not in ans
    nm = next(s for s in labels["studies"] if s["study_id"] == "NM_JPEG2000_UNC")
    assert {"finding": "body_part_chest", "tag": "BodyPartExamined", "tag_value": "WHOLE BODY"}.items() <= next(
        s for s in nm["skipped"] if s["finding"] == "body_part_chest").items()
    assert labels["source_package"] == "pydicom-data"


def test_demo_images_load_through_data(demo):
    _, _, ds = demo
    for path in ds.rows.drop_duplicates("study_id")["image_abspath"]:
        li = load_image(path)
        g = np.asarray(li.image)
        assert li.image.mode == "RGB" and li.source_kind == "dicom" and g.std() > 5


def test_build_options_and_errors(tmp_path):
    one = build_demo_dataset(tmp_path / "one", studies=[DemoStudy("CHEST", "RG1_UNCI.dcm")])
    ds = load_dataset(one, strict=True)
    assert ds.study_ids == ("CHEST",) and len(ds.rows) == 5 * 6
    with pytest.raises(ValueError, match="no file named"):
        pydicom_data_file("no_such_file.dcm")
    with pytest.raises(ValueError, match="duplicate"):
        build_demo_dataset(tmp_path / "dup", studies=[DEMO_STUDIES[0], DEMO_STUDIES[0]])
