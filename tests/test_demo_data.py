"""Tests for medvlm.data.demo_data: a demo CSV from pydicom-data whose labels come from DICOM headers,
plus two real NIH ChestX-ray14 radiographs whose labels the question builder reads from NIH's
Data_Entry_2017_v2020 (torchxrayvision's copy, or the extract committed beside the images)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pydicom
import pytest

import medvlm.data.findings
from medvlm.data.data import load_dataset, load_image
from medvlm.data.demo_data import (
    DEMO_FINDINGS,
    DEMO_LABELS_NAME,
    DEMO_STUDIES,
    NIH_DEMO_FINDINGS,
    NIH_DEMO_IMAGES,
    NIH_DIR,
    NIH_EXTRACT,
    DemoStudy,
    build_demo_dataset,
    demo_label_rows,
    pydicom_data_file,
)
from medvlm.data.questions import wordings

NIH_IDS = {name[:-4] for name in NIH_DEMO_IMAGES}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    csv_path = build_demo_dataset(out)
    labels = json.loads((out / DEMO_LABELS_NAME).read_text())
    return csv_path, labels, load_dataset(csv_path, strict=True)


def test_demo_validates_clean(demo):
    csv_path, _, ds = demo
    assert ds.ok and ds.warnings == ()
    assert ds.n_studies == len(DEMO_STUDIES) + len(NIH_DEMO_IMAGES)
    assert ds.mapping.scheme == "canonical"
    assert {"RG1_UNCI", "RG3_UNCI"} <= set(ds.study_ids)
    assert ds.study_ids[:2] == ("RG1_UNCI", "RG3_UNCI")  # DICOM cases first: --n_studies 2 stays on them
    dicom = ds.rows[~ds.rows["study_id"].isin(NIH_IDS)]
    assert all(p.startswith("/") and p.endswith(".dcm") for p in dicom["image_abspath"])
    # every study has a subject (PatientID, or the study id where the tag is empty): cluster_by works
    assert load_dataset(csv_path, strict=True, cluster_by="subject_id").ok


def test_six_variants_per_finding_with_one_answer(demo):
    _, _, ds = demo
    by_name = {f.name: list(f.questions) for f in DEMO_FINDINGS}
    by_name |= {f: [q for q, _ in wordings(f)] for f in NIH_DEMO_FINDINGS}
    for (_, finding), g in ds.rows.groupby(["study_id", "finding"]):
        assert sorted(g["variant_id"]) == list(range(6))
        assert g["answer_gt"].nunique() == 1
        assert g.sort_values("variant_id")["question"].tolist() == by_name[finding]
    for f in DEMO_FINDINGS:
        assert len(set(f.questions)) == 6


def test_labels_match_the_dicom_headers(demo):
    _, labels, ds = demo
    by_name = {f.name: f for f in DEMO_FINDINGS}
    csv_answers = ds.rows.groupby(["study_id", "finding"])["answer_gt"].first().to_dict()
    assert len(labels["studies"]) == ds.n_studies - len(NIH_DEMO_IMAGES)
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


def _nih_truth(label_file) -> dict[tuple[str, str], str]:
    """The two images' answers, read straight from the label file's Finding Labels."""
    d = pd.read_csv(label_file)
    d = d[d["Image Index"].isin(NIH_DEMO_IMAGES)]
    assert len(d) == 2
    name = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Effusion"}
    return {(i[:-4], f): "yes" if name[f] in labels.split("|") else "no"
            for i, labels in zip(d["Image Index"], d["Finding Labels"], strict=True) for f in NIH_DEMO_FINDINGS}


def test_nih_radiographs_with_their_real_labels(demo):
    csv_path, labels, ds = demo
    nih = ds.rows[ds.rows["study_id"].isin(NIH_IDS)]
    assert len(nih) == len(NIH_DEMO_IMAGES) * len(NIH_DEMO_FINDINGS) * 6
    answers = nih.groupby(["study_id", "finding"])["answer_gt"].first().to_dict()
    assert answers == _nih_truth(labels["nih"]["label_file"])
    assert answers[("00000001_000", "cardiomegaly")] == "yes"  # Data_Entry: "Cardiomegaly"
    assert set(nih["subject_id"]) == {"1", "27426"}
    assert set(nih["image_abspath"]) == {str(NIH_DIR / n) for n in NIH_DEMO_IMAGES}
    assert nih["label_source"].str.contains("NLP-mined").all()
    assert (ds.rows.loc[~ds.rows["study_id"].isin(NIH_IDS), "label_source"].str.contains("DICOM")).all()
    info = labels["nih"]
    assert "NLP" in info["label_source"] and "NIH Clinical Center" in info["credit"] and "Wang X" in info["credit"]
    assert not any("BBox" in n for n in info["builder_notes"]), "the demo reads no box file: no note on one"
    assert {s["study_id"]: s["finding_labels"] for s in info["studies"]} == {
        "00000001_000": "Cardiomegaly", "00027426_000": "No Finding"}
    notes = " ".join(labels["notes"])
    assert "RANDOM WEIGHTS" in notes and "NLP" in notes
    for path in set(nih["image_abspath"]):
        li = load_image(path)
        assert li.image.size == (512, 512) and np.asarray(li.image).std() > 10


def test_nih_labels_fall_back_to_the_committed_extract(tmp_path, monkeypatch):
    monkeypatch.setattr(medvlm.data.findings, "torchxrayvision_data_file", lambda name: None)
    csv_path = build_demo_dataset(tmp_path, studies=[DemoStudy("CHEST", "RG1_UNCI.dcm")])
    labels = json.loads((tmp_path / DEMO_LABELS_NAME).read_text())
    assert labels["nih"]["label_file"] == str(NIH_EXTRACT) and "extract" in labels["nih"]["label_file_origin"]
    ds = load_dataset(csv_path, strict=True)
    nih = ds.rows[ds.rows["study_id"].isin(NIH_IDS)]
    assert nih.groupby(["study_id", "finding"])["answer_gt"].first().to_dict() == _nih_truth(NIH_EXTRACT)


def test_demo_label_rows_are_the_label_files_rows_for_the_demo_images(tmp_path):
    """demo_label_rows reads only the lines whose Image Index names a demo image (gzipped or not),
    equal to reading the whole file and selecting them; a file whose first column is another
    comes back whole."""
    extract = NIH_EXTRACT.read_text().splitlines()
    header, rows = extract[0], extract[1:]
    decoys = ["00000001_0001.png,Cardiomegaly,0,1,57,M,PA,1,1,0.1,0.1",  # a longer name with a demo prefix
              "00000002_000.png,00000001_000.png,0,2,50,F,AP,1,1,0.1,0.1"]  # a demo name in a later field
    body = [decoys[0], rows[0], decoys[1], f'"{rows[1].split(",", 1)[0]}",{rows[1].split(",", 1)[1]}']
    gz = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("\n".join([header, *body]) + "\n")
    got = demo_label_rows(gz)
    whole = pd.read_csv(gz, dtype=str, keep_default_na=False)
    want = whole[whole["Image Index"].isin(NIH_DEMO_IMAGES)].reset_index(drop=True)
    assert len(want) == 2 and got.equals(want)
    assert demo_label_rows(NIH_EXTRACT).equals(pd.read_csv(NIH_EXTRACT, dtype=str, keep_default_na=False))
    moved = tmp_path / "moved.csv"
    whole[["Finding Labels", "Image Index", "Patient ID", "View Position"]].to_csv(moved, index=False)
    assert len(demo_label_rows(moved)) == len(body)
    packaged = medvlm.data.findings.torchxrayvision_data_file("Data_Entry_2017_v2020.csv.gz")
    if packaged is not None:  # the 112,120-row file the demo reads
        full = pd.read_csv(packaged, dtype=str, keep_default_na=False)
        assert demo_label_rows(packaged).equals(full[full["Image Index"].isin(NIH_DEMO_IMAGES)].reset_index(drop=True))


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
    for path in ds.rows[~ds.rows["study_id"].isin(NIH_IDS)].drop_duplicates("study_id")["image_abspath"]:
        li = load_image(path)
        g = np.asarray(li.image)
        assert li.image.mode == "RGB" and li.source_kind == "dicom" and g.std() > 5


def test_build_options_and_errors(tmp_path):
    one = build_demo_dataset(tmp_path / "one", studies=[DemoStudy("CHEST", "RG1_UNCI.dcm")], nih=False)
    ds = load_dataset(one, strict=True)
    assert ds.study_ids == ("CHEST",) and len(ds.rows) == 5 * 6
    with pytest.raises(ValueError, match="no file named"):
        pydicom_data_file("no_such_file.dcm")
    with pytest.raises(ValueError, match="duplicate"):
        build_demo_dataset(tmp_path / "dup", studies=[DEMO_STUDIES[0], DEMO_STUDIES[0]])
