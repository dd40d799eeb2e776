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
The CSV uses the canonical schema of :mod:`medvlm.data` and refers to the DICOM files by
their absolute paths inside the installed package; ``demo_labels.json`` beside it records,
per study, the file, the tag values read and the rule behind every label, and which
findings were skipped and why, so a report can cite them.

These are acquisition-metadata questions on a handful of mixed-modality images: they
exercise the pipeline end to end, they say nothing about diagnostic ability.
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
            "tags": tags,
            "labels": labels,
            "skipped": skipped,
        })
    return out


def build_demo_dataset(
    out_dir: str | os.PathLike[str],
    studies: Sequence[DemoStudy] = DEMO_STUDIES,
    findings: Sequence[DemoFinding] = DEMO_FINDINGS,
) -> Path:
    """Write ``demo_questions.csv`` and ``demo_labels.json`` into ``out_dir``; return the CSV path.

    CSV columns: study_id, image_path (absolute), finding, variant_id, question, answer_gt.
    Rows are in study order, then finding, then variant 0..5.
    """
    if not studies:
        raise ValueError("build_demo_dataset needs at least one study")
    ids = [s.study_id for s in studies]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate demo study ids: {ids}")
    for f in findings:
        if len(f.questions) != 6:
            raise ValueError(f"finding {f.name!r} has {len(f.questions)} paraphrases, need 6")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = demo_labels(studies, findings)
    by_name = {f.name: f for f in findings}

    csv_path = out / DEMO_CSV_NAME
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", "image_path", "finding", "variant_id", "question", "answer_gt"])
        for study in labels:
            for label in study["labels"]:
                finding = by_name[label["finding"]]
                for variant, question in enumerate(finding.questions):
                    writer.writerow([study["study_id"], study["image_path"], finding.name, variant,
                                     question, label["answer_gt"]])

    from importlib.metadata import PackageNotFoundError, version

    try:
        source_version = version("pydicom-data")
    except PackageNotFoundError:
        source_version = None
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
    (out / DEMO_LABELS_NAME).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return csv_path
