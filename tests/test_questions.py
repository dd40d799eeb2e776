"""Tests for medvlm.data.questions: the question bank and the builder, run on every real label file
torchxrayvision's wheel ships (NIH Data_Entry + BBox_List, the Google 2019 NIH expert labels,
CheXpert, VinDr-CXR), with every count checked against a direct pandas count of the same file.

MIMIC-CXR-JPG is not shipped anywhere: its test writes small files whose headers follow the
documented layout of mimic-cxr-2.0.0-chexpert.csv and mimic-cxr-2.0.0-metadata.csv exactly
(PhysioNet MIMIC-CXR-JPG 2.0.0), with made-up ids and labels.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medvlm.data.data import load_dataset
from medvlm.data.findings import load_finding_map, torchxrayvision_data_file
from medvlm.data.questions import build_questions, load_question_bank, main, read_label_file, wordings

ROOT = Path(__file__).resolve().parents[1]
NIH_DIR = ROOT / "data" / "nih-cxr14"
EXTRACT = NIH_DIR / "Data_Entry_2017_v2020_extract.csv"


def _xrv(name: str) -> Path:
    path = torchxrayvision_data_file(name)
    if path is None:
        pytest.skip(f"torchxrayvision (requirements-dev.txt) with data/{name} is not installed")
    return path


# --------------------------------------------------------------------------- the question bank


def bank_problems(finding: str, entry: dict, fmap) -> list[str]:
    """Every rule a finding's wordings must keep; [] when all hold."""
    out = []
    direct, negated = entry.get("questions", []), entry.get("negated", [])
    if len(direct) != 6:
        out.append(f"{len(direct)} direct wordings, need 6")
    if len(negated) != 3:
        out.append(f"{len(negated)} negated wordings, need 3")
    every = direct + negated
    if len(set(map(str.lower, every))) != len(every):
        out.append("duplicate wordings")
    for q in every:
        if not q.endswith("?"):
            out.append(f"no question mark: {q!r}")
        if re.search(r"\b(yes|no)\b", q, re.IGNORECASE):
            out.append(f"says yes/no: {q!r}")
        if fmap.find_phrase(q, finding) is None:
            out.append(f"neither the term nor a synonym: {q!r}")
    with_ctx = [q for q in direct if "in this chest x-ray" in q.lower()]
    if not with_ctx or len(with_ctx) == len(direct):
        out.append("direct wordings must include some with and some without 'in this chest X-ray'")
    if direct and not re.match(r"^Is (there|this) ", direct[0]):
        out.append(f"variant 0 is not the plain 'Is there ...?': {direct[0]!r}")
    return out


def test_bank_covers_every_finding_and_keeps_its_rules():
    fmap = load_finding_map()
    bank = load_question_bank()
    assert set(bank["findings"]) == set(fmap.findings)
    assert bank["negated_variants"] == [3, 4, 5]
    problems = {f: bank_problems(f, e, fmap) for f, e in bank["findings"].items()}
    assert {f: p for f, p in problems.items() if p} == {}
    all_wordings = [q.lower() for e in bank["findings"].values() for q in e["questions"] + e["negated"]]
    assert len(all_wordings) == len(set(all_wordings)) == 26 * 9


def test_bank_checks_can_fail():
    fmap = load_finding_map()
    bad = {"questions": ["Is there a pleural effusion", "Is the answer yes?", "Is the heart big?",
                         "Is there a pleural effusion", "Is there fluid around the lung in this chest X-ray?",
                         "Any effusion?"], "negated": ["Is there no pleural effusion?"]}
    text = " | ".join(bank_problems("pleural_effusion", bad, fmap))
    for fragment in ("no question mark", "says yes/no", "neither the term", "duplicate", "1 negated"):
        assert fragment in text


def test_wordings_with_negations():
    plain = wordings("pleural_effusion")
    neg = wordings("pleural_effusion", include_negations=True)
    assert [p for _, p in plain] == ["direct"] * 6
    assert [p for _, p in neg] == ["direct"] * 3 + ["negated"] * 3
    assert neg[:3] == plain[:3] and neg[0][0] == "Is there a pleural effusion?"
    with pytest.raises(ValueError, match="no questions for finding 'bogus'"):
        wordings("bogus")


# --------------------------------------------------------------------------- real label files


@pytest.fixture(scope="module")
def nih():
    path = _xrv("Data_Entry_2017_v2020.csv.gz")
    return path, pd.read_csv(path), read_label_file("nih", path)


def _study_labels(result) -> dict[tuple[str, str], set[str]]:
    """{(study, finding): the variant-0 answers} - a study must have exactly one per finding."""
    v0 = result.rows[result.rows["variant_id"] == 0]
    return v0.groupby(["study_id", "finding"])["answer_gt"].agg(set).to_dict()


def test_nih_counts_match_pandas_and_answers_match_labels(nih):
    path, raw, table = nih
    labels = raw.set_index(raw["Image Index"].str[:-4])["Finding Labels"].str.split("|")
    direct = {"pleural_effusion": ["Effusion"], "cardiomegaly": ["Cardiomegaly"], "nodule_mass": ["Nodule", "Mass"],
              "no_finding": ["No Finding"], "pleural_thickening": ["Pleural_Thickening"]}
    r = build_questions("nih", table, list(direct), n_studies=40, seed=3)
    for f, labs in direct.items():
        n_pos = int(labels.apply(lambda xs, labs=labs: any(x in labs for x in xs)).sum())
        assert r.counts[f] == {"positive": 20, "negative": 20, "available_positive": n_pos,
                               "available_negative": len(raw) - n_pos}, f
    per = _study_labels(r)
    assert all(len(a) == 1 for a in per.values())  # never both positive and negative for a finding
    for (study, f), answers in per.items():
        truth = any(x in direct[f] for x in labels[study])
        assert answers == {"yes" if truth else "no"}, (study, f)
    subject = raw.set_index(raw["Image Index"].str[:-4])["Patient ID"].astype(str)
    assert (r.rows["subject_id"] == r.rows["study_id"].map(subject)).all()
    assert (r.rows.groupby(["study_id", "finding"]).size() == 6).all()
    assert r.rows["image_path"].str.fullmatch(r"images/\d{8}_\d{3}\.png").all()


def test_nih_seeds_reproduce_and_differ(nih):
    _, _, table = nih
    a = build_questions("nih", table, ["edema"], n_studies=10, seed=5).rows
    b = build_questions("nih", table, ["edema"], n_studies=10, seed=5).rows
    c = build_questions("nih", table, ["edema"], n_studies=10, seed=6).rows
    pd.testing.assert_frame_equal(a, b)
    assert set(a["study_id"]) != set(c["study_id"])
    # a finding's draw does not depend on which other findings are asked
    both = build_questions("nih", table, ["cardiomegaly", "edema"], n_studies=10, seed=5).rows
    assert set(both.loc[both["finding"] == "edema", "study_id"]) == set(a["study_id"])


def test_nih_views_and_ratio(nih):
    _, raw, table = nih
    r = build_questions("nih", table, ["hernia"], n_studies=9, negatives_per_positive=2, views=["PA"], seed=0)
    pa = raw[raw["View Position"] == "PA"]
    assert r.counts["hernia"]["available_positive"] == int(pa["Finding Labels"].str.contains("Hernia").sum())
    assert r.counts["hernia"]["positive"] == 3 and r.counts["hernia"]["negative"] == 6
    assert r.skipped == {"image view AP not in --views PA": int((raw["View Position"] == "AP").sum())}
    every = build_questions("nih", table, ["hernia"], negatives_per_positive=0, views=["PA"])
    assert every.counts["hernia"]["positive"] == r.counts["hernia"]["available_positive"]
    assert every.counts["hernia"]["negative"] == 0


def test_nih_regions_match_bbox_list(nih):
    path, raw, table = nih
    boxes = pd.read_csv(_xrv("BBox_List_2017.csv.gz")).iloc[:, :6]
    boxes.columns = ["image", "label", "x", "y", "w", "h"]
    r = build_questions("nih", table, ["cardiomegaly", "nodule_mass"], negatives_per_positive=0)
    reg = r.regions
    assert list(reg.columns) == ["study_id", "image_path", "finding", "x", "y", "w", "h", "image_width",
                                 "image_height", "source"]
    positive = set(raw.loc[raw["Finding Labels"].str.contains("Cardiomegaly"), "Image Index"])
    want = boxes[(boxes["label"] == "Cardiomegaly") & boxes["image"].isin(positive)]
    got = reg[reg["finding"] == "cardiomegaly"].sort_values(["study_id", "x"])
    assert len(got) == len(want) > 100
    assert got["x"].tolist() == pytest.approx(want.sort_values(["image", "x"])["x"].tolist())
    nm = boxes[boxes["label"].isin(["Nodule", "Mass"])]
    assert (reg["finding"] == "nodule_mass").sum() == len(nm)
    assert (reg["image_width"] == 1024).all() and (reg["source"] == "NIH BBox_List_2017").all()
    sampled = set(zip(r.rows["study_id"], r.rows["finding"], strict=True))
    assert set(zip(reg["study_id"], reg["finding"], strict=True)) <= sampled


def test_regions_only_for_positive_studies(tmp_path):
    """A box on a study labelled negative (here a made-up one) is counted and left out."""
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                     "00000001_000.png,Cardiomegaly,10,20,30,40\n00027426_000.png,Cardiomegaly,1,2,3,4\n")
    r = build_questions("nih", EXTRACT, ["cardiomegaly"], negatives_per_positive=None, boxes=boxes,
                        out=tmp_path / "q.csv")
    reg = pd.read_csv(tmp_path / "q_regions.csv", dtype={"study_id": str})
    assert reg[["study_id", "x", "y", "w", "h", "image_width"]].values.tolist() == [["00000001_000", 10, 20, 30, 40,
                                                                                    1024]]
    assert r.skipped == {"box on a study sampled as negative for its finding (not written)": 1}


def test_google2019_expert_labels():
    path = _xrv("google2019_nih-chest-xray-labels.csv.gz")
    raw = pd.read_csv(path)
    r = build_questions("nih-google2019", path, ["fracture", "nodule or mass", "airspace_opacity"], n_studies=20)
    expert = (("fracture", "Fracture"), ("nodule_mass", "Nodule or mass"), ("airspace_opacity", "Airspace opacity"))
    for f, col in expert:
        assert r.counts[f]["available_positive"] == int((raw[col] == "YES").sum())
        assert r.counts[f]["available_negative"] == int((raw[col] == "NO").sum())
    truth = raw.set_index(raw["Image Index"].str[:-4])["Fracture"]
    v0 = r.rows[(r.rows["variant_id"] == 0) & (r.rows["finding"] == "fracture")]
    assert len(v0) == 20
    assert (v0["answer_gt"].str.upper() == v0["study_id"].map(truth)).all()


@pytest.fixture(scope="module")
def chexpert():
    raw = pd.read_csv(_xrv("chexpert_train.csv.gz"), dtype=str, keep_default_na=False)
    return raw, read_label_file("chexpert", raw)


def _chexpert_frontal(raw: pd.DataFrame) -> pd.DataFrame:
    """One frontal image per study, PA before AP, then file order: the rule, by hand."""
    d = raw[raw["AP/PA"].isin(["PA", "AP"]) & (raw["Frontal/Lateral"] == "Frontal")].copy()
    d["study"] = d["Path"].str.split("/").str[2:4].str.join("_")
    d["rank"] = (d["AP/PA"] == "AP").astype(int)
    return d.sort_values(["rank"], kind="stable").drop_duplicates("study")


def test_chexpert_counts_match_pandas(chexpert):
    raw, table = chexpert
    front = _chexpert_frontal(raw)
    r = build_questions("chexpert", table, ["Pleural Effusion", "cardiomegaly", "no_finding"], n_studies=30, seed=1)
    for f, col in (("pleural_effusion", "Pleural Effusion"), ("cardiomegaly", "Cardiomegaly"),
                   ("no_finding", "No Finding")):
        v = pd.to_numeric(front[col], errors="coerce")
        assert r.counts[f]["available_positive"] == int((v == 1).sum()), f
        assert r.counts[f]["available_negative"] == int(((v == 0) | v.isna()).sum()), f  # blank = negative
        assert r.skipped.get(f"{f}: uncertain (-1), --uncertain ignore", 0) == int((v == -1).sum())
        assert r.counts[f]["positive"] == 15
    per = _study_labels(r)
    assert all(len(a) == 1 for a in per.values())
    truth = front.set_index("study")
    for (study, f), answers in per.items():
        col = {"pleural_effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly", "no_finding": "No Finding"}[f]
        assert answers == {"yes" if truth.at[study, col] == "1.0" else "no"}
    chosen = r.rows.drop_duplicates("study_id").set_index("study_id")["image_path"]
    assert (chosen == truth.loc[chosen.index, "Path"]).all()  # the PA image where a study has one
    assert (r.rows["subject_id"] == r.rows["study_id"].str.split("_").str[0]).all()


def test_chexpert_uncertain_and_blank_options(chexpert, tmp_path):
    raw, _ = chexpert
    part = raw.iloc[:3000]
    front = _chexpert_frontal(part)
    v = pd.to_numeric(front["Edema"], errors="coerce")
    for uncertain, blank, pos, neg in (("ones", "negative", (v == 1) | (v == -1), (v == 0) | v.isna()),
                                       ("zeros", "ignore", v == 1, (v == 0) | (v == -1))):
        t = read_label_file("chexpert", part, uncertain=uncertain, blank=blank)
        r = build_questions("chexpert", t, ["edema"], n_studies=10)
        assert r.counts["edema"]["available_positive"] == int(pos.sum())
        assert r.counts["edema"]["available_negative"] == int(neg.sum())
    with pytest.raises(ValueError, match="--uncertain must be one of ignore, ones, zeros"):
        read_label_file("chexpert", part, uncertain="maybe")


@pytest.fixture(scope="module")
def vindr():
    path = _xrv("vinbigdata-train.csv.gz")
    return path, pd.read_csv(path), read_label_file("vindr", path)


def test_vindr_majority_rule_counts_and_regions(vindr, tmp_path):
    path, raw, table = vindr
    readers = raw.groupby("image_id")["rad_id"].nunique()
    r = build_questions("vindr", table, ["Nodule/Mass", "pneumothorax", "aortic_enlargement"], n_studies=20)
    for f, cls in (("nodule_mass", "Nodule/Mass"), ("pneumothorax", "Pneumothorax"),
                   ("aortic_enlargement", "Aortic enlargement")):
        k = raw[raw["class_name"] == cls].groupby("image_id")["rad_id"].nunique().reindex(readers.index, fill_value=0)
        assert r.counts[f]["available_positive"] == int((2 * k > readers).sum())
        assert r.counts[f]["available_negative"] == int((k == 0).sum())
        assert r.skipped[f"{f}: readers disagree (some but not majority marked it)"] == int(
            ((k > 0) & (2 * k <= readers)).sum())
    assert all(len(a) == 1 for a in _study_labels(r).values())
    reg = r.regions
    positive = r.rows[(r.rows["answer_gt"] == "yes") & (r.rows["variant_id"] == 0)]
    pairs = set(zip(positive["study_id"], positive["finding"], strict=True))
    assert set(zip(reg["study_id"], reg["finding"], strict=True)) == pairs
    name = {"nodule_mass": "Nodule/Mass", "pneumothorax": "Pneumothorax", "aortic_enlargement": "Aortic enlargement"}
    want = raw[[(i, c) in {(s, name[f]) for s, f in pairs} for i, c in zip(raw["image_id"], raw["class_name"],
                                                                            strict=True)]]
    assert len(reg) == len(want)
    assert sorted(reg["source"].str.removeprefix("VinDr-CXR rad ")) == sorted(want["rad_id"])
    assert (reg["w"] > 0).all() and reg["image_width"].isna().all()  # no image given: size unknown
    r_any = build_questions("vindr", path, ["pneumothorax"], n_studies=10, vindr_rule="any")
    k = raw[raw["class_name"] == "Pneumothorax"]["image_id"].nunique()
    assert r_any.counts["pneumothorax"]["available_positive"] == k


# --------------------------------------------------------------------------- MIMIC-CXR-JPG (documented layout)

MIMIC_LABEL_HEADER = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                      "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
                      "Pneumothorax,Support Devices")
MIMIC_META_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                     "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                     "PatientOrientationCodeSequence_CodeMeaning")


def _mimic(tmp_path: Path) -> tuple[Path, Path]:
    # study: pleural effusion label (index 11 of the 14 after the ids)
    effusion = {"50000001": "1.0", "50000002": "0.0", "50000003": "-1.0", "50000004": "", "50000005": "1.0",
                "50000006": "1.0"}
    rows = []
    for i, (study, val) in enumerate(effusion.items()):
        cells = [""] * 14
        cells[9] = val
        rows.append(",".join([f"1000000{i % 3}", study, *cells]))
    labels = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    labels.write_text(MIMIC_LABEL_HEADER + "\n" + "\n".join(rows) + "\n")
    meta = [  # (dicom, subject, study, view)
        ("d1lat", "10000000", "50000001", "LATERAL"), ("d1ap", "10000000", "50000001", "AP"),
        ("d1pa", "10000000", "50000001", "PA"), ("d2ap", "10000001", "50000002", "AP"),
        ("d3pa", "10000002", "50000003", "PA"), ("d4pa", "10000000", "50000004", "PA"),
        ("d5lat", "10000001", "50000005", "LATERAL"), ("d6ll", "10000002", "50000006", "LL"),
        ("d6pa", "10000002", "50000006", "PA"),
    ]
    metadata = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
    metadata.write_text(MIMIC_META_HEADER + "\n" + "\n".join(
        f"{d},{s},{st},CHEST (PA AND LAT),{v},3050,2539,21800506,213014.531,CHEST (PA AND LAT),"
        f"postero-anterior,Erect" for d, s, st, v in meta) + "\n")
    return labels, metadata


def test_mimic_documented_layout(tmp_path):
    labels, metadata = _mimic(tmp_path)
    r = build_questions("mimic-cxr", labels, ["pleural_effusion"], negatives_per_positive=None)  # metadata beside
    assert r.counts["pleural_effusion"] == {"positive": 2, "negative": 2, "available_positive": 2,
                                            "available_negative": 2}
    v0 = r.rows[r.rows["variant_id"] == 0].set_index("study_id")
    assert v0.at["50000001", "image_path"] == "files/p10/p10000000/s50000001/d1pa.jpg"  # PA before AP
    assert v0.at["50000002", "image_path"].endswith("/d2ap.jpg")
    assert v0.at["50000001", "answer_gt"] == "yes" and v0.at["50000004", "answer_gt"] == "no"  # blank: negative
    assert "50000003" not in v0.index and "50000005" not in v0.index  # uncertain; lateral only
    assert r.skipped["pleural_effusion: uncertain (-1), --uncertain ignore"] == 1
    assert r.skipped["image view LATERAL not in --views PA AP"] == 2
    assert (v0["subject_id"].str.fullmatch(r"1000000\d")).all()
    ones = build_questions("mimic-cxr", labels, ["effusion"], metadata=metadata, uncertain="ones",
                           negatives_per_positive=None)
    assert ones.counts["pleural_effusion"]["positive"] == 3
    (tmp_path / "img" / "files/p10/p10000000/s50000001").mkdir(parents=True)
    (tmp_path / "img" / "files/p10/p10000000/s50000001/d1ap.jpg").write_bytes(b"x")
    found = build_questions("mimic-cxr", labels, ["effusion"], images=tmp_path / "img", negatives_per_positive=None)
    assert found.rows["study_id"].unique().tolist() == ["50000001"]
    assert found.rows["image_path"].iloc[0] == str(tmp_path / "img/files/p10/p10000000/s50000001/d1ap.jpg")
    assert found.skipped[f"image not under --images {tmp_path / 'img'}"] == 5  # 6 frontal images, 1 found
    metadata.unlink()
    with pytest.raises(ValueError, match="MIMIC-CXR needs its metadata file"):
        build_questions("mimic-cxr", labels, ["effusion"])


# --------------------------------------------------------------------------- writing, CLI, errors


def test_cli_writes_csv_that_validates(tmp_path, capsys):
    img = tmp_path / "images"
    shutil.copytree(NIH_DIR, img, ignore=shutil.ignore_patterns("*.md", "*.csv"))
    out = tmp_path / "q.csv"
    code = main(["build", "--dataset", "nih", "--labels", str(EXTRACT), "--images", str(img), "--findings",
                 "cardiomegaly", "effusion", "--negatives_per_positive", "all", "--include_negations",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "cardiomegaly: 1 positive, 1 negative" in text and "pleural_effusion: 0 positive, 2 negative" in text
    ds = load_dataset(out, strict=True, cluster_by="subject_id")
    assert ds.n_studies == 2 and set(ds.rows["image_path"]) == {"images/00000001_000.png", "images/00027426_000.png"}
    rows = pd.read_csv(out, dtype=str)
    assert list(rows.columns) == ["study_id", "image_path", "finding", "variant_id", "question", "answer_gt",
                                  "subject_id", "polarity"]
    for _, g in rows.groupby(["study_id", "finding"]):
        g = g.set_index("variant_id")
        for v in "345":
            assert g.at[v, "polarity"] == "negated" and g.at[v, "answer_gt"] != g.at["0", "answer_gt"]
        assert (g.loc[["0", "1", "2"], "answer_gt"] == g.at["0", "answer_gt"]).all()
    build = json.loads((tmp_path / "q.build.json").read_text())
    assert build["counts"]["cardiomegaly"]["positive"] == 1 and "NLP" in build["label_source"]
    assert not (tmp_path / "q_regions.csv").exists()  # no BBox_List beside the extract


def test_missing_images_are_counted_and_skipped(tmp_path):
    img = tmp_path / "one"
    img.mkdir()
    shutil.copy(NIH_DIR / "00000001_000.png", img)
    r = build_questions("nih", EXTRACT, ["cardiomegaly"], images=img, negatives_per_positive=None,
                        out=tmp_path / "q.csv")
    assert r.rows["study_id"].unique().tolist() == ["00000001_000"]
    assert r.skipped == {f"image not under --images {img}": 1}
    assert any("00027426_000.png" in n for n in r.notes)
    assert r.rows["image_path"].iloc[0] == "one/00000001_000.png"  # under the CSV's folder: relative


def test_example_csv_is_what_the_builder_writes(tmp_path):
    shutil.copytree(NIH_DIR, tmp_path / "nih-cxr14")
    build_questions("nih", tmp_path / "nih-cxr14" / EXTRACT.name, ["cardiomegaly", "pleural_effusion"],
                    images=tmp_path / "nih-cxr14", negatives_per_positive=None, out=tmp_path / "example_questions.csv")
    committed = ROOT / "data" / "example_questions.csv"
    assert (tmp_path / "example_questions.csv").read_text() == committed.read_text()
    ds = load_dataset(committed, strict=True)
    assert ds.ok and ds.n_studies == 2 and not ds.warnings


@pytest.mark.parametrize("kwargs, match", [
    ({"dataset": "padchest"}, r"unknown dataset 'padchest'; choose one of nih, nih-google2019"),
    ({"findings": ["fracture"]}, r"extract.csv: finding 'fracture' is not in nih; valid: atelectasis, cardiomegaly"),
    ({"findings": ["cardiomegaly"], "n_studies": 4}, r"cardiomegaly has 1 positive stud\(ies\).*needs 2"),
    ({"dataset": "chexpert"}, r"extract.csv: not a chexpert label file \(missing column\(s\) Path.*looks like a nih"),
    ({"dataset": "vindr"}, r"not a vindr label file .*use --dataset nih\)"),
    ({"n_studies": 0}, r"--n_studies must be a positive integer"),
    ({"n_studies": 2, "negatives_per_positive": None}, r"per_positive all cannot be combined with --n_studies"),
    ({"findings": []}, r"give at least one finding"),
    ({"images": "/no/such/dir"}, r"/no/such/dir: --images is not a directory"),
])
def test_refusals_write_nothing(tmp_path, kwargs, match):
    args = {"dataset": "nih", "labels": EXTRACT, "findings": ["cardiomegaly"], "out": tmp_path / "q.csv"} | kwargs
    with pytest.raises(ValueError, match=match):
        build_questions(args.pop("dataset"), args.pop("labels"), args.pop("findings"), **args)
    assert list(tmp_path.iterdir()) == []


def test_refusals_on_files(tmp_path, capsys):
    out = tmp_path / "q.csv"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="q.csv: already exists"):
        build_questions("nih", EXTRACT, ["cardiomegaly"], negatives_per_positive=None, out=out)
    assert out.read_text() == "keep me"
    with pytest.raises(ValueError, match="label file not found"):
        build_questions("nih", tmp_path / "none.csv", ["cardiomegaly"])
    code = main(["build", "--dataset", "chexpert", "--labels", str(EXTRACT), "--findings", "edema", "--out",
                 str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "not a chexpert label file" in err
    assert not (tmp_path / "x.csv").exists()
    assert main(["findings", "--dataset", "vindr"]) == 0
    assert "nodule_mass" in capsys.readouterr().out


def test_flag_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--dataset", "nih", "--labels", "l.csv", "--findings", "a", "--out", "q.csv",
              "--n_studies", "x"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --n_studies: invalid int value: 'x' (see python -m medvlm.data.questions")


def test_a_blank_nih_label_is_skipped_not_a_negative(tmp_path):
    labels = tmp_path / EXTRACT.name
    labels.write_text(EXTRACT.read_text() + "00000003_000.png,,0,3,50,F,PA,2500,2048,0.14,0.14\n")
    r = build_questions("nih", labels, ["cardiomegaly"], negatives_per_positive=None)
    assert "00000003_000" not in set(r.rows["study_id"])
    assert r.skipped["cardiomegaly: Finding Labels blank (NIH writes No Finding)"] == 1


def test_out_never_replaces_an_input_and_cannot_write_is_one_line(tmp_path, capsys):
    labels = tmp_path / EXTRACT.name
    shutil.copy(EXTRACT, labels)
    before = labels.read_bytes()
    args = ["build", "--dataset", "nih", "--labels", str(labels), "--findings", "cardiomegaly",
            "--negatives_per_positive", "all", "--overwrite", "--out"]  # fmt: skip
    assert main([*args, str(labels)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {labels}: is an input of this build ({labels}); choose another --out\n"
    assert labels.read_bytes() == before and sorted(tmp_path.iterdir()) == [labels]
    (tmp_path / "afile").write_text("x")
    assert main([*args, str(tmp_path / "afile" / "q.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'afile'}: cannot write --out") and err.count("\n") == 1
