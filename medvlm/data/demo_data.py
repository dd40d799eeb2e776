"""A small demo dataset built from the real DICOM files that the pydicom-data package ships.

No chest X-ray data set with findings can be shipped, so the demo asks questions whose
ground truth is written in each file's DICOM header, never invented:

    finding           tag               answer_gt is "yes" iff
    modality_cr       Modality          Modality == "CR"
    modality_ct       Modality          Modality == "CT"
    modality_mr       Modality          Modality == "MR"
    body_part_chest   BodyPartExamined  BodyPartExamined == "CHEST" ("no" only for body parts
                                        that exclude the chest: EXTREMITY, HEAD, ABDOMEN, ...)
    view_pa           ViewPosition      ViewPosition == "PA"

A finding whose tag is absent or empty in a file, or whose value decides neither way
(BodyPartExamined "WHOLE BODY" for the chest question), is skipped for that study (no label
is made up). Each finding is asked in six paraphrases (variant 0 is the original wording).
The CSV uses the canonical schema of :mod:`medvlm.data.data` and refers to the DICOM files by
their absolute paths inside the installed package; ``demo_labels.json`` beside it records,
per study, the file, the tag values read and the rule behind every label, and which
findings were skipped and why, so a report can cite them.

These are acquisition-metadata questions on a handful of mixed-modality images: they
exercise the pipeline end to end, they say nothing about diagnostic ability.

Two real chest radiographs follow them: NIH ChestX-ray14 images 00000001_000.png and
00027426_000.png (``data/nih-cxr14/`` in the repository, 512 x 512 as torchxrayvision's test
folder distributes them), asked about cardiomegaly and pleural effusion by the question builder
(:func:`medvlm.data.questions.build_questions`) from their labels in Data_Entry_2017_v2020.csv:
torchxrayvision's packaged copy when it is installed, else the two-row extract committed beside
the images. Those labels were mined from radiology reports by NLP (Wang et al. 2017), not read
from the images; ``demo_labels.json`` says so, names the label file it used, and credits the NIH
Clinical Center. The CSV's ``label_source`` column names each row's source; ``subject_id`` is
NIH's Patient ID, and for the DICOMs the PatientID tag (the study id where the tag is empty).

    python -c "from medvlm.data.demo_data import build_demo_dataset as b; print(b('/tmp/demo_data'))"
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEMO_CSV_NAME = "demo_questions.csv"
DEMO_LABELS_NAME = "demo_labels.json"
REPO_DATA = Path(__file__).resolve().parents[2] / "data"
NIH_DIR = REPO_DATA / "nih-cxr14"
NIH_DEMO_IMAGES = ("00000001_000.png", "00027426_000.png")
NIH_DEMO_FINDINGS = ("cardiomegaly", "pleural_effusion")
NIH_LABELS_NAME = "Data_Entry_2017_v2020.csv.gz"
NIH_EXTRACT = NIH_DIR / "Data_Entry_2017_v2020_extract.csv"
NIH_CREDIT = (
    "NIH ChestX-ray14 images and labels courtesy of the NIH Clinical Center "
    "(https://nihcc.app.box.com/v/ChestXray-NIHCC); Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. "
    "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification "
    "and Localization of Common Thorax Diseases. IEEE CVPR 2017, pp. 3462-3471."
)
CSV_COLUMNS = ("study_id", "image_path", "finding", "variant_id", "question", "answer_gt", "subject_id", "label_source")
DICOM_SOURCE = "DICOM header tag (pydicom-data)"


@dataclass(frozen=True)
class DemoFinding:
    """name: finding id; tag: DICOM keyword read; positive: the tag value meaning "yes";
    questions: six paraphrases, index = variant_id (0 = original); negative: the values
    meaning "no", or None when every other value means "no" (a value in neither set
    decides nothing, and the finding is skipped for that study)."""

    name: str
    tag: str
    positive: str
    questions: tuple[str, str, str, str, str, str]
    negative: tuple[str, ...] | None = None

    @property
    def rule(self) -> str:
        if self.negative is None:
            return f"yes if {self.tag} == {self.positive!r}, else no"
        return (f"yes if {self.tag} == {self.positive!r}; no if {self.tag} in "
                f"{list(self.negative)!r}; any other value: skipped")

    def answer(self, value: str) -> str | None:
        """"yes", "no", or None when ``value`` does not decide the question."""
        v = value.strip().upper()
        if v == self.positive.upper():
            return "yes"
        if self.negative is None or v in {n.upper() for n in self.negative}:
            return "no"
        return None


@dataclass(frozen=True)
class DemoStudy:
    """study_id used in the CSV and the pydicom-data file it points to."""

    study_id: str
    filename: str


def _modality(code: str, name: str, article: str = "a") -> DemoFinding:
    return DemoFinding(
        name=f"modality_{code.lower()}",
        tag="Modality",
        positive=code,
        questions=(
            f"Is this {article} {code} ({name}) image?",
            f"Was this image acquired with {name} ({code})?",
            f"Is the imaging modality of this picture {name}?",
            f"Does this image come from {article} {name} ({code}) examination?",
            f"Is this {article} {name} image?",
            f"Would you classify this image as {name} ({code})?",
        ),
    )


DEMO_FINDINGS: tuple[DemoFinding, ...] = (
    _modality("CR", "computed radiography"),
    _modality("CT", "computed tomography"),
    _modality("MR", "magnetic resonance", article="an"),
    DemoFinding(
        name="body_part_chest",
        tag="BodyPartExamined",
        positive="CHEST",
        questions=(
            "Does this image show the chest?",
            "Is the chest the body part shown in this image?",
            "Is this an image of the chest?",
            "Was the chest the body part examined here?",
            "Does this picture depict the thorax?",
            "Is this a chest image?",
        ),
        # Body parts whose images do not contain the chest. WHOLE BODY, SHOULDER, SPINE,
        # ABDOMEN-and-chest composites and the like decide nothing and are skipped.
        negative=("EXTREMITY", "LEG", "ARM", "HAND", "FOOT", "KNEE", "ANKLE", "ELBOW", "WRIST",
                  "HIP", "PELVIS", "ABDOMEN", "HEAD", "SKULL", "BRAIN"),
    ),
    DemoFinding(
        name="view_pa",
        tag="ViewPosition",
        positive="PA",
        questions=(
            "Is this a PA view?",
            "Was this image taken in the posteroanterior (PA) projection?",
            "Is the view position of this image PA (posteroanterior)?",
            "Is this a posteroanterior view?",
            "Did the X-ray beam pass from back to front for this image?",
            "Is this image a PA projection?",
        ),
    ),
)

# Uncompressed (or RLE) files that decode with pydicom alone and load in well under a second.
DEMO_STUDIES: tuple[DemoStudy, ...] = (
    DemoStudy("RG1_UNCI", "RG1_UNCI.dcm"),  # CR, CHEST, PA, MONOCHROME1
    DemoStudy("RG3_UNCI", "RG3_UNCI.dcm"),  # CR, EXTREMITY (leg), AP, MONOCHROME1
    DemoStudy("693_UNCI", "693_UNCI.dcm"),  # CT (head), no BodyPartExamined, rescale + window
    DemoStudy("MR_SIEMENS_OVERLAYS", "MR-SIEMENS-DICOM-WithOverlays.dcm"),  # MR, ABDOMEN
    DemoStudy("EMRI_SMALL", "emri_small.dcm"),  # MR, HEAD, 10 frames (first used)
    DemoStudy("US1_UNCI", "US1_UNCI.dcm"),  # US, RGB
    DemoStudy("NM_JPEG2000_UNC", "JPEG2000_UNC.dcm"),  # NM, WHOLE BODY (uncompressed despite name)
)


def pydicom_data_file(name: str) -> Path:
    """Absolute path of ``name`` in the installed pydicom-data package (never downloads).

    pydicom-data registers itself as pydicom's external data source "pydicom-data" (its
    module is ``data_store``); this asks that source directly. ValueError if the package is
    missing or does not hold the file.
    """
    from pydicom.data.data_manager import external_data_sources

    source = external_data_sources().get("pydicom-data")
    if source is None:
        raise ValueError("the pydicom-data package is not installed (pip install pydicom-data)")
    try:
        return Path(source.get_path(name))
    except ValueError as e:
        raise ValueError(f"pydicom-data has no file named {name!r}") from e


def _tag_value(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def demo_labels(
    studies: Sequence[DemoStudy] = DEMO_STUDIES,
    findings: Sequence[DemoFinding] = DEMO_FINDINGS,
) -> list[dict]:
    """Per study: its file, the header values read, its labels and its skipped findings."""
    import pydicom

    out = []
    for study in studies:
        path = pydicom_data_file(study.filename)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # pydicom raises many types for a damaged file
            raise ValueError(f"{path}: cannot read the DICOM header ({type(e).__name__}: {e})") from e
        tags = {f.tag: _tag_value(ds, f.tag) for f in findings}
        labels, skipped = [], []
        for f in findings:
            value = tags[f.tag]
            if value is None:
                skipped.append({"finding": f.name, "tag": f.tag, "tag_value": None,
                                "reason": "tag absent or empty"})
                continue
            answer = f.answer(value)
            if answer is None:
                skipped.append({"finding": f.name, "tag": f.tag, "tag_value": value,
                                "reason": f"value {value!r} decides neither yes nor no ({f.rule})"})
                continue
            labels.append({
                "finding": f.name,
                "tag": f.tag,
                "tag_value": value,
                "rule": f.rule,
                "answer_gt": answer,
            })
        out.append({
            "study_id": study.study_id,
            "file": study.filename,
            "image_path": str(path),
            "sop_instance_uid": _tag_value(ds, "SOPInstanceUID"),
            "patient_id": _tag_value(ds, "PatientID"),
            "tags": tags,
            "labels": labels,
            "skipped": skipped,
        })
    return out


def nih_label_file() -> tuple[Path, str]:
    """(label file, where it came from): torchxrayvision's packaged Data_Entry_2017_v2020 when
    installed, else the two-row extract committed beside the demo images."""
    from medvlm.data.findings import torchxrayvision_data_file

    packaged = torchxrayvision_data_file(NIH_LABELS_NAME)
    if packaged is not None:
        return packaged, "torchxrayvision's packaged copy of NIH Data_Entry_2017_v2020.csv"
    if not NIH_EXTRACT.is_file():
        raise ValueError(f"{NIH_EXTRACT}: missing, and torchxrayvision is not installed: no NIH labels for the demo")
    return NIH_EXTRACT, "two-row extract of NIH Data_Entry_2017_v2020.csv (data/nih-cxr14/SOURCE.md)"


def demo_label_rows(path: str | os.PathLike[str], images: Sequence[str] = NIH_DEMO_IMAGES):
    """The NIH label file's rows for `images` as read_label_file takes them (a DataFrame of
    strings, blanks ""): the header and the lines whose first field, Image Index, names one of
    them, found without parsing the rest (the packaged file has 112,120 rows: reading it whole
    took 1.6 s of the demo). A file whose first column is not Image Index is read whole."""
    import gzip
    import io

    import pandas as pd

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    starts = tuple(f"{q}{name}{q}," for name in images for q in ("", '"'))
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        header = fh.readline()
        if next(csv.reader([header]), [""])[0].strip() != "Image Index":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        lines = [line for line in fh if line.startswith(starts)]
    return pd.read_csv(io.StringIO(header + "".join(lines)), dtype=str, keep_default_na=False)


def nih_demo_questions(labels: str | os.PathLike[str] | None = None, image_dir: str | os.PathLike[str] = NIH_DIR):
    """The question builder's result for the NIH demo images (every labelled study, no sampling)
    and a description of where the labels came from (the label file's rows for the demo images:
    demo_label_rows)."""
    from medvlm.data.questions import LABEL_SOURCES, build_questions, read_label_file

    if labels is None:
        label_path, origin = nih_label_file()
    else:
        label_path, origin = Path(labels), "given label file"
    missing = [n for n in NIH_DEMO_IMAGES if not (Path(image_dir) / n).is_file()]
    if missing:
        raise ValueError(f"{image_dir}: demo image(s) {', '.join(missing)} not found")
    table = read_label_file("nih", demo_label_rows(label_path))
    result = build_questions("nih", table, NIH_DEMO_FINDINGS, images=image_dir, negatives_per_positive=None,
                             absolute_paths=True)
    raw = dict(zip(table.images["study_id"], table.images["raw_labels"], strict=True))
    info = {
        "label_file": str(label_path),
        "label_file_origin": origin,
        "label_source": LABEL_SOURCES["nih"],
        "credit": NIH_CREDIT,
        "images": str(image_dir),
        "findings": list(NIH_DEMO_FINDINGS),
        "counts": result.counts,
        # the builder reads the demo images' rows only: its notes on images outside the folder and on
        # NIH's box file (which the demo does not use: its region is demo_regions_NOT_EXPERT.csv) are left out
        "builder_notes": [n for n in result.notes if "not under" not in n and not n.startswith("no BBox_List")],
        "studies": [
            {"study_id": sid, "image_path": g["image_path"].iloc[0], "subject_id": g["subject_id"].iloc[0],
             "finding_labels": raw[sid],
             "labels": dict(g[g["variant_id"] == 0][["finding", "answer_gt"]].itertuples(index=False))}
            for sid, g in result.rows.groupby("study_id", sort=False)
        ],
    }
    return result, info


def build_demo_dataset(
    out_dir: str | os.PathLike[str],
    studies: Sequence[DemoStudy] = DEMO_STUDIES,
    findings: Sequence[DemoFinding] = DEMO_FINDINGS,
    nih: bool = True,
) -> Path:
    """Write ``demo_questions.csv`` and ``demo_labels.json`` into ``out_dir``; return the CSV path.

    CSV columns: study_id, image_path (absolute), finding, variant_id, question, answer_gt,
    subject_id, label_source. Rows: the DICOM studies in order, then finding, then variant
    0..5; then (``nih``) the two NIH radiographs as the question builder writes them.
    """
    if not studies and not nih:
        raise ValueError("build_demo_dataset needs at least one study")
    ids = [s.study_id for s in studies]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate demo study ids: {ids}")
    for f in findings:
        if len(f.questions) != 6:
            raise ValueError(f"finding {f.name!r} has {len(f.questions)} paraphrases, need 6")
    labels = demo_labels(studies, findings)
    by_name = {f.name: f for f in findings}
    nih_result, nih_info = nih_demo_questions() if nih else (None, None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    csv_path = out / DEMO_CSV_NAME
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for study in labels:
            subject = study["patient_id"] or study["study_id"]
            for label in study["labels"]:
                finding = by_name[label["finding"]]
                for variant, question in enumerate(finding.questions):
                    writer.writerow([study["study_id"], study["image_path"], finding.name, variant,
                                     question, label["answer_gt"], subject, DICOM_SOURCE])
        if nih_result is not None:
            source = "NIH Data_Entry_2017_v2020 Finding Labels (NLP-mined from reports)"
            for rec in nih_result.rows.itertuples(index=False):
                writer.writerow([rec.study_id, rec.image_path, rec.finding, rec.variant_id, rec.question,
                                 rec.answer_gt, rec.subject_id, source])

    from importlib.metadata import PackageNotFoundError, version

    try:
        source_version = version("pydicom-data")
    except PackageNotFoundError:
        source_version = None
    notes = [
        "DICOM studies: acquisition-metadata questions whose answers are DICOM header tags; they test the "
        "pipeline, not diagnostic ability.",
        "The demo's models have RANDOM WEIGHTS: no output of the demo says anything about a model.",
    ]
    doc = {
        "description": (
            "Ground truth for the demo questions, read only from DICOM header tags of files in "
            "the pydicom-data package. A finding whose tag is absent is skipped for that study. "
            "Acquisition-metadata questions: they test the pipeline, not diagnostic ability."
        ),
        "source_package": "pydicom-data",
        "source_version": source_version,
        "csv": csv_path.name,
        "findings": [
            {"finding": f.name, "tag": f.tag, "rule": f.rule, "questions": list(f.questions)}
            for f in findings
        ],
        "studies": labels,
    }
    if nih_result is not None:
        notes.insert(1, "NIH ChestX-ray14 studies: labels mined from radiology reports by NLP (Wang et al. 2017), "
                        "not read from the images. " + NIH_CREDIT)
        doc["nih"] = nih_info
    doc["notes"] = notes
    (out / DEMO_LABELS_NAME).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return csv_path

