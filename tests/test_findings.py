"""Tests for medvlm.data.findings: the finding-name map, checked against the real label files that
torchxrayvision's wheel ships (NIH Data_Entry and BBox_List, CheXpert, VinDr-CXR, the Google
2019 NIH expert labels, RSNA, SIIM)."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from medvlm.data.findings import (
    FINDINGS_FILE,
    canonical_finding,
    dataset_labels,
    find_phrase,
    finding_phrases,
    finding_term,
    load_finding_map,
    normalize,
    synonyms,
    torchxrayvision_data_file,
)


def _xrv(name: str):
    path = torchxrayvision_data_file(name)
    if path is None:
        pytest.skip(f"torchxrayvision (requirements-dev.txt) with data/{name} is not installed")
    return path


def _header(name: str, **kw) -> list[str]:
    return list(pd.read_csv(_xrv(name), nrows=0, **kw).columns)


def test_nih_finding_labels_all_map():
    d = pd.read_csv(_xrv("Data_Entry_2017_v2020.csv.gz"), usecols=["Finding Labels"])
    labels = set(d["Finding Labels"].str.split("|").explode())
    assert len(labels) == 15  # 14 findings + No Finding
    mapped = {lab: canonical_finding(lab, "nih") for lab in labels}
    assert None not in mapped.values(), mapped
    assert mapped["Effusion"] == "pleural_effusion" and mapped["Pleural_Thickening"] == "pleural_thickening"
    assert mapped["No Finding"] == "no_finding"
    assert len(set(mapped.values())) == 15
    for lab, finding in mapped.items():
        assert lab in dataset_labels(finding, "nih")


def test_nih_bbox_labels_map():
    d = pd.read_csv(_xrv("BBox_List_2017.csv.gz"), usecols=[0, 1])
    labels = set(d["Finding Label"])
    mapped = {lab: canonical_finding(lab, "nih") for lab in labels}
    assert None not in mapped.values()
    assert mapped["Infiltrate"] == "infiltration"  # BBox spelling of NIH's Infiltration


def test_chexpert_header_maps_all_14():
    cols = _header("chexpert_train.csv.gz")[5:]
    assert len(cols) == 14
    mapped = [canonical_finding(c, "chexpert") for c in cols]
    assert None not in mapped and len(set(mapped)) == 14
    assert canonical_finding("Support Devices", "chexpert") == "support_devices"
    assert [canonical_finding(c, "mimic-cxr") for c in cols] == mapped


def test_vindr_classes_map_or_are_listed_unmapped():
    d = pd.read_csv(_xrv("vinbigdata-train.csv.gz"), usecols=["class_name"])
    fmap = load_finding_map()
    unmapped = {normalize(x) for x in fmap.datasets["vindr"].unmapped}
    for name in set(d["class_name"]):
        found = canonical_finding(name, "vindr")
        assert (found is None) == (normalize(name) in unmapped), name
    assert canonical_finding("Nodule/Mass", "vindr") == "nodule_mass"
    assert canonical_finding("Pulmonary fibrosis", "vindr") == "fibrosis"
    assert canonical_finding("Other lesion", "vindr") is None
    assert dataset_labels("nodule_mass", "nih") == ["Nodule", "Mass"]


def test_google2019_rsna_siim():
    cols = _header("google2019_nih-chest-xray-labels.csv.gz")
    expert = cols[cols.index("Fracture"):cols.index("Set Id")]
    assert [canonical_finding(c, "nih-google2019") for c in expert] == [
        "fracture", "pneumothorax", "airspace_opacity", "nodule_mass"]
    with zipfile.ZipFile(_xrv("kaggle_stage_2_train_labels.csv.zip")) as z:
        header = z.open(z.namelist()[0]).readline().decode().strip().split(",")
    assert header[-1] == "Target" and canonical_finding("Target", "rsna") == "pneumonia"
    assert canonical_finding("Lung Opacity", "rsna") == "pneumonia"
    assert canonical_finding("Lung Opacity", "chexpert") == "lung_opacity"
    assert canonical_finding("Lung Opacity") == "lung_opacity"  # without a data set: the term wins
    siim = _header("siim-pneumothorax-train-rle.csv.gz", skipinitialspace=True)
    assert siim == ["ImageId", "EncodedPixels"] and canonical_finding("Pneumothorax", "siim") == "pneumothorax"


def test_insensitive_lookup_terms_and_synonyms():
    for spelling in ("pleural_effusion", "Pleural Effusion", "PLEURAL-EFFUSION", "  pleural   effusion "):
        assert canonical_finding(spelling) == "pleural_effusion"
    assert canonical_finding("fluid around the lung") == "pleural_effusion"
    assert canonical_finding("enlarged heart") == "cardiomegaly"
    assert canonical_finding("no such thing") is None
    assert canonical_finding("") is None
    assert finding_term("pleural_effusion") == "pleural effusion"
    assert "enlarged heart" in synonyms("cardiomegaly")
    with pytest.raises(ValueError, match="unknown data set 'padchest'"):
        canonical_finding("Effusion", "padchest")
    with pytest.raises(ValueError, match="unknown finding 'bogus'.*cardiomegaly"):
        dataset_labels("bogus", "nih")


def test_phrases_are_unique_across_findings():
    fmap = load_finding_map()
    seen = {}
    for info in fmap.findings.values():
        for phrase in info.phrases:
            assert seen.setdefault(normalize(phrase), info.name) == info.name, phrase
    raw = json.loads(FINDINGS_FILE.read_text())
    raw["findings"]["edema"]["synonyms"].append("enlarged heart")
    from medvlm.data.findings import _parse

    with pytest.raises(ValueError, match="'enlarged heart' names both"):
        _parse(raw, "x.json")


def test_find_phrase_prefers_the_longest_whole_word_match():
    q = "Is there fluid around the lung in this chest X-ray?"
    a, b = find_phrase(q, "pleural_effusion")
    assert q[a:b] == "fluid around the lung"
    q = "Is there a pleural effusion?"
    a, b = find_phrase(q, "pleural_effusion")
    assert q[a:b] == "pleural effusion"
    assert find_phrase("Is the heart normal?", "pleural_effusion") is None
    assert find_phrase("Is there a massive effusion?", "mass") is None  # whole words only
    # a finding outside the map (the DICOM demo's): its own name, underscores as spaces
    q = "Is this a CR (computed radiography) image?"
    assert find_phrase("Is the modality cr here?", "modality_cr") == (7, 18)
    assert find_phrase(q, "modality_cr") is None and finding_phrases("modality_cr") == ("modality cr",)
    assert finding_phrases("Effusion") == finding_phrases("pleural_effusion")


def test_overrides_dict_csv_json(tmp_path):
    m = load_finding_map({"Lung Opacity": "lung_opacity", "Other lesion": "other_lesion", "Effusion": ""})
    assert m.canonical_finding("Lung Opacity", "rsna") == "lung_opacity"
    assert m.canonical_finding("other lesion", "vindr") == "other_lesion"
    assert m.canonical_finding("Effusion", "nih") is None
    assert "Other lesion" in m.dataset_labels("other_lesion", "vindr")
    assert "Effusion" not in m.dataset_labels("pleural_effusion", "nih")
    assert load_finding_map().canonical_finding("Effusion", "nih") == "pleural_effusion"  # packaged map untouched

    csv_path = tmp_path / "map.csv"
    csv_path.write_text("label,finding,dataset\nLung Opacity,lung_opacity,rsna\nOpacity,lung_opacity,\n")
    m = load_finding_map(csv_path)
    assert m.canonical_finding("Lung Opacity", "rsna") == "lung_opacity"
    assert m.canonical_finding("Lung Opacity", "vindr") == "lung_opacity"
    assert m.canonical_finding("opacity") == "lung_opacity"
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"Lung Opacity": "lung_opacity"}))
    assert load_finding_map(js).canonical_finding("Lung Opacity", "rsna") == "lung_opacity"


@pytest.mark.parametrize("text, match", [
    ("label,finding\nA,Not Snake\n", r"map.csv:2: finding 'Not Snake' is not a snake_case"),
    ("lab,fin\nA,b\n", r"map.csv:1: header must have columns label,finding"),
    ("label,finding\nA,b,c\n", r"map.csv:2: has 3 field\(s\)"),
    ("label,finding,dataset\nA,b,padchest\n", r"unknown data set 'padchest'"),
    ("", r"map.csv: empty finding map file"),
])
def test_override_file_errors(tmp_path, text, match):
    p = tmp_path / "map.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_finding_map(p)


def test_override_missing_file(tmp_path):
    with pytest.raises(ValueError, match="finding map file not found"):
        load_finding_map(tmp_path / "none.csv")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: must be a JSON object"):
        load_finding_map(tmp_path / "bad.json")
