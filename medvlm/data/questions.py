"""Build a question CSV from a public chest X-ray data set's own label file.

    python -m medvlm.data.questions build --dataset nih --labels Data_Entry_2017_v2020.csv --images nih/ \\
        --findings effusion cardiomegaly --n_studies 100 --seed 0 --out questions.csv
    python -m medvlm.data.questions build --dataset chexpert --labels CheXpert-v1.0-small/train.csv \\
        --images . --findings pleural_effusion --n_studies 50 --uncertain ignore --out q.csv
    python -m medvlm.data.questions build --dataset mimic-cxr --labels mimic-cxr-2.0.0-chexpert.csv.gz \\
        --metadata mimic-cxr-2.0.0-metadata.csv.gz --findings edema --n_studies 40 --out q.csv
    python -m medvlm.data.questions build --dataset vindr --labels train.csv --findings cardiomegaly \\
        --n_studies 40 --vindr_rule majority --out q.csv
    python -m medvlm.data.questions findings --dataset nih      # the findings a data set can ask about

Label files as distributed: NIH ChestX-ray14 ``Data_Entry_2017_v2020.csv`` (``nih``: pipe-separated
Finding Labels, NLP-mined from reports) and the Google 2019 expert labels
``google2019_nih-chest-xray-labels.csv`` (``nih-google2019``: YES/NO columns); CheXpert
``train.csv``/``valid.csv`` and MIMIC-CXR-JPG ``mimic-cxr-2.0.0-chexpert.csv`` (+
``mimic-cxr-2.0.0-metadata.csv`` for ViewPosition): CheXpert-labeller columns 1 / 0 / -1 / blank,
``--uncertain ignore|ones|zeros`` for -1 (default ignore: U-Ignore), ``--blank negative|ignore``
for blank (not mentioned; default negative); VinDr-CXR ``train.csv`` (Kaggle) or
``annotations_train.csv`` (PhysioNet), one row per reader box: positive when ``--vindr_rule``
(majority|any|all) of the image's readers marked the finding, negative when none did, skipped
when some did but not enough. The data set is checked against the file's header.

Per finding, ``--n_studies N`` studies are sampled with ``--seed``: ceil(N / (1 + r))
positives and the rest negatives (r = ``--negatives_per_positive``, default 1); without N
every positive is used with r x as many negatives (``--negatives_per_positive all``: every
negative). Each study has one frontal image (``--views``, default PA then AP; VinDr has no
view column); subject_id is the data set's patient id (VinDr has none: the image id).
``--images DIR`` keeps only images found there (others are counted and skipped); written
paths are then relative to the CSV's folder when under it, else absolute; without it they
are relative to the data set's root (give the runner ``--image_root``).

Questions come from ``medvlm/data/resources/question_bank.json``: variant 0 the plain question,
1-5 paraphrases. With ``--include_negations`` variants 3-5 are the bank's negated wordings,
whose answer_gt is the opposite of variant 0's, and a ``polarity`` column (direct/negated)
is written. Outputs: the CSV, ``<stem>_regions.csv`` for NIH (BBox_List_2017.csv beside the
labels or ``--boxes``) and VinDr (columns study_id,image_path,finding,x,y,w,h,image_width,
image_height,source; pixels of the image as distributed), and ``<stem>.build.json`` with the
arguments, the label file's sha256, counts and skipped rows. Bad input raises ValueError with
one line naming the file; nothing is written then.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from medvlm.data.findings import RESOURCES, FindingMap, load_finding_map, normalize

BANK_FILE = RESOURCES / "question_bank.json"
DATASETS = ("nih", "nih-google2019", "chexpert", "mimic-cxr", "vindr")
DEFAULT_VIEWS = ("PA", "AP")
UNCERTAIN = ("ignore", "ones", "zeros")
BLANK = ("negative", "ignore")
VINDR_RULES = ("majority", "any", "all")
NIH_IMAGE_SIZE = 1024  # NIH distributes its PNGs at 1024 x 1024; BBox_List_2017 is in those pixels
REGION_COLUMNS = ("study_id", "image_path", "finding", "x", "y", "w", "h", "image_width", "image_height", "source")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
FRAME_NAME = "<DataFrame>"

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")
GOOGLE_LABELS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
# Columns that identify each kind of label file (the header must have all of them).
SIGNATURES = {
    "nih": ("Image Index", "Finding Labels", "Patient ID", "View Position"),
    "nih-google2019": ("Image Index", "Patient ID", "View Position", *GOOGLE_LABELS),
    "chexpert": ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS),
    "mimic-cxr": ("subject_id", "study_id", *CHEXPERT_LABELS),
    "mimic-cxr metadata": ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    "vindr": ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"),
    "NIH BBox_List_2017": ("Image Index", "Finding Label"),
}
LABEL_SOURCES = {
    "nih": "NIH ChestX-ray14 Data_Entry_2017_v2020: labels mined from radiology reports by NLP (Wang et al. "
           "2017), not read from the images; expect label noise",
    "nih-google2019": "NIH ChestX-ray14 images, Google 2019 labels adjudicated by radiologists (Majkowska et al., "
                      "Radiology 2020)",
    "chexpert": "CheXpert: labels from reports by the CheXpert labeller (NLP)",
    "mimic-cxr": "MIMIC-CXR-JPG: labels from reports by the CheXpert labeller (NLP)",
    "vindr": "VinDr-CXR: radiologists' box annotations, combined over readers by the stated rule",
}


@lru_cache(maxsize=1)
def load_question_bank() -> dict:
    """{finding: {"questions": [6 direct wordings], "negated": [3]}} plus the bank's metadata."""
    return json.loads(BANK_FILE.read_text(encoding="utf-8"))


def wordings(finding: str, include_negations: bool = False) -> list[tuple[str, str]]:
    """The six (question, polarity) pairs asked for ``finding``, index = variant_id."""
    bank = load_question_bank()
    entry = bank["findings"].get(finding)
    if entry is None:
        raise ValueError(f"{BANK_FILE}: no questions for finding {finding!r}")
    out = [(q, "direct") for q in entry["questions"]]
    if include_negations:
        for slot, q in zip(bank["negated_variants"], entry["negated"], strict=True):
            out[slot] = (q, "negated")
    return out


@dataclass
class LabelTable:
    """A label file read into one row per image: study_id, subject_id, image_rel (path under
    the data set's root), image_key (file name, for look-ups), view, and per finding a column
    ``L:<finding>`` holding "pos", "neg" or the reason the label is unknown. ``boxes``: one
    row per box (study_id, finding, x, y, w, h, source) when the data set has them."""

    dataset: str
    path: Path
    images: pd.DataFrame
    findings: tuple[str, ...]
    boxes: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)


@dataclass
class BuildResult:
    rows: pd.DataFrame
    regions: pd.DataFrame | None
    counts: dict
    skipped: dict
    notes: list[str]
    provenance: dict

    def summary(self) -> str:
        lines = [f"{self.provenance['dataset']}: {self.rows['study_id'].nunique()} studies, {len(self.rows)} "
                 f"questions from {self.provenance['labels']}"]
        for f, c in self.counts.items():
            lines.append(f"  {f}: {c['positive']} positive, {c['negative']} negative sampled "
                         f"(of {c['available_positive']} / {c['available_negative']} available)")
        for why, n in self.skipped.items():
            lines.append(f"  skipped {n}: {why}")
        if self.regions is not None:
            lines.append(f"  regions: {len(self.regions)} box(es)")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading


def _header(path: Path) -> list[str]:
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read as a CSV label file ({type(e).__name__}: {e})") from e


def _check_header(path: Path, header: Sequence[str], kind: str) -> None:
    missing = [c for c in SIGNATURES[kind] if c not in header]
    if not missing:
        return
    looks = sorted((k for k, cols in SIGNATURES.items() if k != kind and all(c in header for c in cols)),
                   key=lambda k: -len(SIGNATURES[k]))
    hint = ""
    if looks:
        hint = f"; its header looks like a {looks[0]} file"
        if looks[0] in DATASETS:
            hint += f" (use --dataset {looks[0]})"
    raise ValueError(f"{path}: not a {kind} label file (missing column(s) {', '.join(missing)}){hint}")


def _read(path: Path | pd.DataFrame, kind: str, usecols=None) -> pd.DataFrame:
    if isinstance(path, pd.DataFrame):  # a label file already read (tests read CheXpert's 223k rows once)
        _check_header(Path(FRAME_NAME), [str(c).strip() for c in path.columns], kind)
        return path.astype(str).replace("nan", "").rename(columns=lambda c: str(c).strip())
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: label file not found")
    _check_header(path, _header(path), kind)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=usecols)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as a CSV label file ({type(e).__name__}: {e})") from e
    frame.columns = [c.strip() for c in frame.columns]
    if frame.empty:
        raise ValueError(f"{path}: header but no data rows")
    return frame


def _beside(path: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for cand in (path.parent / name, path.parent / (name + ".gz")):
            if cand.is_file():
                return cand
    return None


def _chexpert_code(values: pd.Series, uncertain: str, blank: str) -> pd.Series:
    v = values.str.strip()
    num = pd.to_numeric(v, errors="coerce")
    out = pd.Series("label not 1/0/-1/blank", index=v.index, dtype=object)
    out[num == 1] = "pos"
    out[num == 0] = "neg"
    out[num == -1] = {"ignore": "uncertain (-1), --uncertain ignore", "ones": "pos", "zeros": "neg"}[uncertain]
    out[v == ""] = {"negative": "neg", "ignore": "blank (not mentioned), --blank ignore"}[blank]
    return out


def _label_columns(fmap: FindingMap, dataset: str, header: Sequence[str]) -> dict[str, list[str]]:
    """{finding: the header's columns that are its labels} for column-per-label files."""
    out: dict[str, list[str]] = {}
    for col in header:
        f = fmap.canonical_finding(col, dataset)
        if f is not None and col in (CHEXPERT_LABELS if dataset in ("chexpert", "mimic-cxr") else GOOGLE_LABELS):
            out.setdefault(f, []).append(col)
    return out


def read_label_file(dataset: str, labels: str | os.PathLike[str] | pd.DataFrame, *, metadata=None, boxes=None,
                    uncertain: str = "ignore", blank: str = "negative", vindr_rule: str = "majority",
                    finding_map: FindingMap | None = None) -> LabelTable:
    """Read a data set's label file as distributed (or that file already read into a DataFrame
    of strings, blanks as "") into a :class:`LabelTable`."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if uncertain not in UNCERTAIN:
        raise ValueError(f"--uncertain must be one of {', '.join(UNCERTAIN)}, got {uncertain!r}")
    if blank not in BLANK:
        raise ValueError(f"--blank must be one of {', '.join(BLANK)}, got {blank!r}")
    if vindr_rule not in VINDR_RULES:
        raise ValueError(f"--vindr_rule must be one of {', '.join(VINDR_RULES)}, got {vindr_rule!r}")
    fmap = finding_map or load_finding_map()
    src = labels if isinstance(labels, pd.DataFrame) else Path(labels).expanduser()
    path = Path(FRAME_NAME) if isinstance(labels, pd.DataFrame) else src
    beside = (lambda names: None) if isinstance(labels, pd.DataFrame) else (lambda names: _beside(path, names))
    notes: list[str] = []
    box_frame = None
    options: dict = {}
    if dataset in ("nih", "nih-google2019"):
        used = {"Image Index", "Finding Labels", "Patient ID", "View Position", *GOOGLE_LABELS}
        d = _read(src, dataset, usecols=lambda c: c.strip() in used)
        index = d["Image Index"].str.strip()
        images = pd.DataFrame({
            "study_id": index.str.rsplit(".", n=1).str[0], "subject_id": d["Patient ID"].str.strip(),
            "image_rel": "images/" + index, "image_key": index, "view": d["View Position"].str.strip().str.upper(),
        })
        cols: dict[str, pd.Series] = {}
        if "Finding Labels" in d.columns:
            images["raw_labels"] = d["Finding Labels"].str.strip()
        if dataset == "nih":
            # each distinct "a|b" string (about 800 of them) split and normalised once
            combos = {c: {normalize(x) for x in c.split("|")} for c in pd.unique(d["Finding Labels"])}
            for f in fmap.dataset_findings("nih"):
                want = {normalize(x) for x in fmap.dataset_labels(f, "nih")}
                cols[f] = d["Finding Labels"].map({c: "pos" if s & want else "neg" if c.strip() else
                                                   "Finding Labels blank (NIH writes No Finding)"
                                                   for c, s in combos.items()})  # fmt: skip
        else:
            for f, names in _label_columns(fmap, dataset, list(d.columns)).items():
                v = d[names[0]].str.strip().str.upper()
                cols[f] = v.map({"YES": "pos", "NO": "neg"}).fillna("label not YES/NO")
        box_path = Path(boxes).expanduser() if boxes else beside(["BBox_List_2017.csv"])
        if box_path is not None:
            b = _read(box_path, "NIH BBox_List_2017")
            vals = b.iloc[:, 2:6].apply(pd.to_numeric, errors="coerce")
            finding = b["Finding Label"].map(lambda s: fmap.canonical_finding(s, "nih"))
            box_frame = pd.DataFrame({"study_id": b["Image Index"].str.rsplit(".", n=1).str[0], "finding": finding,
                                      "x": vals.iloc[:, 0], "y": vals.iloc[:, 1], "w": vals.iloc[:, 2],
                                      "h": vals.iloc[:, 3], "image_width": NIH_IMAGE_SIZE,
                                      "image_height": NIH_IMAGE_SIZE, "source": "NIH BBox_List_2017"})
            composite = [box_frame[b["Finding Label"].map(normalize).isin({normalize(x) for x in labs})].assign(
                finding=f) for f, labs in fmap.datasets["nih"].any_of.items()]
            box_frame = pd.concat([box_frame, *composite]).dropna(subset=["finding", "x", "y", "w", "h"])
            options["boxes"] = str(box_path)
        else:
            notes.append("no BBox_List_2017.csv beside the labels and no --boxes: no regions file")
    elif dataset == "chexpert":
        d = _read(src, "chexpert")
        parts = d["Path"].str.strip().str.split("/")
        images = pd.DataFrame({
            "study_id": parts.str[-3] + "_" + parts.str[-2], "subject_id": parts.str[-3],
            "image_rel": d["Path"].str.strip(), "image_key": d["Path"].str.strip(),
            "view": np.where(d["Frontal/Lateral"].str.strip().str.lower() == "lateral", "LATERAL",
                             d["AP/PA"].str.strip().str.upper()),
        })
        cols = {f: _chexpert_code(d[names[0]], uncertain, blank)
                for f, names in _label_columns(fmap, dataset, list(d.columns)).items()}
    elif dataset == "mimic-cxr":
        d = _read(src, "mimic-cxr")
        meta_path = Path(metadata).expanduser() if metadata else beside(["mimic-cxr-2.0.0-metadata.csv"])
        if meta_path is None:
            raise ValueError(f"{path}: MIMIC-CXR needs its metadata file (mimic-cxr-2.0.0-metadata.csv) for "
                             "ViewPosition: pass --metadata")
        m = _read(meta_path, "mimic-cxr metadata", usecols=["dicom_id", "subject_id", "study_id", "ViewPosition"])
        options["metadata"] = str(meta_path)
        d = d.drop_duplicates(subset=["study_id"])
        n_no_image = int((~d["study_id"].isin(m["study_id"])).sum())
        if n_no_image:
            notes.append(f"{n_no_image} labelled stud(ies) have no image in the metadata file")
        j = m.merge(d, on="study_id", how="inner", suffixes=("_meta", ""))
        sid, study = j["subject_id"].str.strip(), j["study_id"].str.strip()
        images = pd.DataFrame({
            "study_id": study, "subject_id": sid,
            "image_rel": "files/p" + sid.str[:2] + "/p" + sid + "/s" + study + "/" + j["dicom_id"].str.strip() + ".jpg",
            "view": j["ViewPosition"].str.strip().str.upper(),
        })
        images["image_key"] = images["image_rel"]
        cols = {f: _chexpert_code(j[names[0]], uncertain, blank)
                for f, names in _label_columns(fmap, dataset, list(d.columns)).items()}
    else:  # vindr
        d = _read(src, "vindr")
        d["image_id"] = d["image_id"].str.strip()
        if "rad_id" not in d.columns:
            d["rad_id"] = "consensus"
            notes.append("no rad_id column: each image's rows are one consensus reading")
        d["finding"] = d["class_name"].map(lambda s: fmap.canonical_finding(s, "vindr"))
        unknown = sorted(set(d.loc[d["finding"].isna(), "class_name"]))
        if unknown:
            notes.append(f"VinDr classes without a finding (not asked): {', '.join(unknown)}")
        ids = pd.unique(d["image_id"])
        images = pd.DataFrame({"study_id": ids, "subject_id": ids, "image_rel": ["train/" + i + ".dicom" for i in ids],
                               "image_key": ids, "view": ""})
        n_readers = d.groupby("image_id")["rad_id"].nunique()
        marked = d.dropna(subset=["finding"]).groupby(["image_id", "finding"])["rad_id"].nunique()
        cols = {}
        for f in fmap.dataset_findings("vindr"):
            k = marked.xs(f, level="finding") if f in marked.index.get_level_values("finding") else pd.Series(
                dtype=float)
            k = k.reindex(n_readers.index, fill_value=0)
            holds = {"majority": 2 * k > n_readers, "any": k >= 1, "all": k == n_readers}[vindr_rule]
            code = pd.Series(np.where(holds, "pos", np.where(k == 0, "neg", "")), index=n_readers.index, dtype=object)
            code[code == ""] = f"readers disagree (some but not {vindr_rule} marked it)"
            cols[f] = code.reindex(ids).to_numpy()
        v = d[d["finding"].notna() & (d["x_min"].str.strip() != "")]
        xy = v[["x_min", "y_min", "x_max", "y_max"]].apply(pd.to_numeric, errors="coerce")
        box_frame = pd.DataFrame({"study_id": v["image_id"], "finding": v["finding"],
                                  "x": xy["x_min"], "y": xy["y_min"], "w": xy["x_max"] - xy["x_min"],
                                  "h": xy["y_max"] - xy["y_min"], "image_width": np.nan, "image_height": np.nan,
                                  "source": "VinDr-CXR rad " + v["rad_id"].str.strip()}).dropna(subset=["x", "y"])
        options["vindr_rule"] = vindr_rule
    for f, series in cols.items():
        images["L:" + f] = np.asarray(series)
    images["order"] = np.arange(len(images))
    if dataset in ("chexpert", "mimic-cxr"):
        options.update(uncertain=uncertain, blank=blank)
    return LabelTable(dataset, path, images.reset_index(drop=True), tuple(sorted(cols)), box_frame, notes, options)


# --------------------------------------------------------------------------- images


def _image_index(root: Path) -> dict[str, Path]:
    """{file name and stem: path} of every image under root (first found wins)."""
    index: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES):
                p = Path(folder) / name
                index.setdefault(name, p)
                index.setdefault(name.rsplit(".", 1)[0], p)
    return index


def _locate(table: LabelTable, root: Path) -> list[Path | None]:
    """Each image's path under ``root``, or None when it is not there."""
    if table.dataset in ("nih", "nih-google2019", "vindr"):
        index = _image_index(root)
        return [index.get(k) for k in table.images["image_key"]]
    out: list[Path | None] = []
    for rel in table.images["image_rel"]:
        parts = Path(rel).parts
        hit = next((root.joinpath(*parts[i:]) for i in range(min(2, len(parts)))
                    if root.joinpath(*parts[i:]).is_file()), None)
        out.append(hit)
    return out


def _dicom_size(path: Path) -> tuple[float, float]:
    if path.suffix.lower() not in (".dcm", ".dicom"):
        return (np.nan, np.nan)
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (float(ds.Columns), float(ds.Rows))


# --------------------------------------------------------------------------- building


def _n_needed(n_studies: int | None, ratio: float | None, n_pos_available: int) -> tuple[int, int | None]:
    """(positives, negatives or None for all) to draw for one finding."""
    if n_studies is None:
        return n_pos_available, (None if ratio is None else int(round(ratio * n_pos_available)))
    n_pos = math.ceil(n_studies / (1 + ratio))  # type: ignore[operator]
    return n_pos, n_studies - n_pos


def build_questions(
    dataset: str,
    labels: str | os.PathLike[str] | LabelTable,
    findings: Sequence[str],
    *,
    images: str | os.PathLike[str] | None = None,
    n_studies: int | None = None,
    negatives_per_positive: float | None = 1,
    seed: int = 0,
    views: Sequence[str] | None = None,
    uncertain: str = "ignore",
    blank: str = "negative",
    vindr_rule: str = "majority",
    metadata: str | os.PathLike[str] | None = None,
    boxes: str | os.PathLike[str] | None = None,
    include_negations: bool = False,
    finding_map: FindingMap | str | os.PathLike[str] | dict | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    absolute_paths: bool = False,
) -> BuildResult:
    """Sample studies per finding from a label file and make the six questions for each.

    ``labels`` is the label file, or a :class:`LabelTable` already read with
    :func:`read_label_file`. With ``out`` the CSV, regions and ``.build.json`` are written
    (refused when they exist unless ``overwrite``); see the module docstring for the rest.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if n_studies is not None and (isinstance(n_studies, bool) or not isinstance(n_studies, int) or n_studies < 1):
        raise ValueError(f"--n_studies must be a positive integer, got {n_studies!r}")
    if negatives_per_positive is not None and not (negatives_per_positive >= 0):
        raise ValueError(f"--negatives_per_positive must be >= 0 or 'all', got {negatives_per_positive!r}")
    if n_studies is not None and negatives_per_positive is None:
        raise ValueError("--negatives_per_positive all cannot be combined with --n_studies (give a number)")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    fmap = finding_map if isinstance(finding_map, FindingMap) else load_finding_map(finding_map)
    table = labels if isinstance(labels, LabelTable) else read_label_file(
        dataset, labels, metadata=metadata, boxes=boxes, uncertain=uncertain, blank=blank, vindr_rule=vindr_rule,
        finding_map=fmap)
    if table.dataset != dataset:
        raise ValueError(f"{table.path}: was read as {table.dataset}, not {dataset}")
    if not findings:
        raise ValueError("give at least one finding (--findings)")
    wanted: list[str] = []
    for name in findings:
        f = fmap.canonical_finding(name, dataset)
        if f is None or f not in table.findings:
            raise ValueError(f"{table.path}: finding {name!r} is not in {dataset}; valid: {', '.join(table.findings)}")
        if f not in wanted:
            wanted.append(f)
    for f in wanted:
        wordings(f, include_negations)  # every finding must have its questions before anything is drawn
    out_paths = _out_paths(out) if out is not None else None
    inputs = [table.path, *(Path(table.options[k]) for k in ("metadata", "boxes") if table.options.get(k)),
              *([Path(finding_map)] if isinstance(finding_map, str | os.PathLike) else [])]  # fmt: skip
    for written in (out_paths or {}).values():
        mine = next((i for i in inputs if written.exists() and i.exists() and os.path.samefile(written, i)), None)
        if mine is not None:  # even with --overwrite: the user's own input is never replaced
            raise ValueError(f"{written}: is an input of this build ({mine}); choose another --out")
    if out_paths and not overwrite:
        exists = [str(p) for p in out_paths.values() if p.exists()]
        if exists:
            raise ValueError(f"{exists[0]}: already exists (pass --overwrite to replace it)")

    notes = list(table.notes)
    skipped: Counter = Counter()
    imgs = table.images
    view_order = [v.strip().upper() for v in (views or DEFAULT_VIEWS)]
    if dataset == "vindr":
        if views:
            notes.append("VinDr-CXR's label file has no view column: --views not applied")
    else:
        keep = imgs["view"].isin(view_order)
        for v, n in imgs.loc[~keep, "view"].replace("", "(blank)").value_counts().items():
            skipped[f"image view {v} not in --views {' '.join(view_order)}"] += int(n)
        imgs = imgs[keep]
    imgs = imgs.assign(found=None)
    if images is not None:
        root = Path(images).expanduser()
        if not root.is_dir():
            raise ValueError(f"{root}: --images is not a directory")
        found = _locate(LabelTable(dataset, table.path, imgs, table.findings), root)
        imgs = imgs.assign(found=found)
        missing = imgs["found"].isna()
        if missing.any():
            skipped[f"image not under --images {root}"] += int(missing.sum())
            examples = ", ".join(imgs.loc[missing, "image_key"].head(3))
            notes.append(f"{int(missing.sum())} image(s) not under {root}, e.g. {examples}")
        imgs = imgs[~missing]
    rank = {v: i for i, v in enumerate(view_order)}
    imgs = imgs.assign(_rank=imgs["view"].map(rank).fillna(len(rank))).sort_values(["_rank", "order"])
    dup = imgs.duplicated("study_id")
    if dup.any():
        skipped["another image of the same study was chosen (one frontal image per study)"] += int(dup.sum())
    imgs = imgs[~dup].sort_values("order").set_index("study_id", drop=False)

    counts: dict = {}
    chosen: dict[str, dict[str, str]] = {}  # finding -> {study: "pos"/"neg"}
    ratio = negatives_per_positive
    for f in wanted:
        code = imgs["L:" + f]
        pos = sorted(code.index[code == "pos"])
        neg = sorted(code.index[code == "neg"])
        for why, n in code[~code.isin(("pos", "neg"))].value_counts().items():
            skipped[f"{f}: {why}"] += int(n)
        n_pos, n_neg = _n_needed(n_studies, ratio, len(pos))
        if n_pos > len(pos):
            raise ValueError(f"{table.path}: {f} has {len(pos)} positive stud(ies) after the filters above, "
                             f"--n_studies {n_studies} needs {n_pos}")
        if n_studies is not None and n_neg is not None and n_neg > len(neg):
            raise ValueError(f"{table.path}: {f} has {len(neg)} negative stud(ies) after the filters above, "
                             f"--n_studies {n_studies} needs {n_neg}")
        if n_neg is not None and n_neg > len(neg):
            notes.append(f"{f}: {n_neg} negatives wanted, only {len(neg)} available: all used")
            n_neg = len(neg)
        rng = np.random.default_rng([int(seed), zlib.crc32(f.encode())])
        take_pos = [pos[i] for i in sorted(rng.choice(len(pos), size=n_pos, replace=False))]
        take_neg = neg if n_neg is None else [neg[i] for i in sorted(rng.choice(len(neg), size=n_neg, replace=False))]
        chosen[f] = {**{s: "pos" for s in take_pos}, **{s: "neg" for s in take_neg}}
        counts[f] = {"positive": len(take_pos), "negative": len(take_neg), "available_positive": len(pos),
                     "available_negative": len(neg)}
        if not take_pos:
            notes.append(f"{f}: no positive study sampled")

    studies = sorted({s for c in chosen.values() for s in c})
    order = np.random.default_rng([int(seed), 1]).permutation(len(studies))
    csv_dir = out_paths["csv"].parent if out_paths else Path.cwd()
    path_of = {s: _written_path(imgs.at[s, "found"], imgs.at[s, "image_rel"], csv_dir, absolute_paths)
               for s in studies}
    records = []
    for i in order:
        s = studies[i]
        for f in wanted:
            if s not in chosen[f]:
                continue
            truth = "yes" if chosen[f][s] == "pos" else "no"
            for variant, (q, polarity) in enumerate(wordings(f, include_negations)):
                answer = truth if polarity == "direct" else ("no" if truth == "yes" else "yes")
                rec = {"study_id": s, "image_path": path_of[s], "finding": f, "variant_id": variant, "question": q,
                       "answer_gt": answer, "subject_id": imgs.at[s, "subject_id"]}
                if include_negations:
                    rec["polarity"] = polarity
                records.append(rec)
    columns = ["study_id", "image_path", "finding", "variant_id", "question", "answer_gt", "subject_id"]
    rows = pd.DataFrame(records, columns=columns + (["polarity"] if include_negations else []))
    regions = _regions(table, chosen, imgs, path_of, skipped)
    provenance = {
        "dataset": dataset, "label_source": LABEL_SOURCES[dataset],
        "labels": _written_path(table.path, "", csv_dir, absolute_paths) if table.path.is_file() else str(table.path),
        "labels_sha256": _sha256(table.path) if table.path.is_file() else None,
        "findings": wanted, "n_studies": n_studies,
        "negatives_per_positive": "all" if ratio is None else ratio, "seed": int(seed),
        "views": None if dataset == "vindr" else view_order,
        "images": None if images is None else _written_path(images, "", csv_dir, absolute_paths),
        "include_negations": include_negations, "question_bank": "medvlm/data/resources/question_bank.json",
        "question_bank_sha256": _sha256(BANK_FILE),
        **{k: _written_path(v, "", csv_dir, absolute_paths) if k in ("boxes", "metadata") else v
           for k, v in table.options.items()},
        "counts": counts, "skipped": dict(skipped), "notes": notes,
    }
    result = BuildResult(rows, regions, counts, dict(skipped), notes, provenance)
    if out_paths:
        _write(result, out_paths)
    return result


def _is_path(value) -> bool:
    return isinstance(value, str | os.PathLike)


def _written_path(found, rel: str, csv_dir: Path, absolute: bool) -> str:
    if not _is_path(found):
        return rel
    p = Path(os.path.abspath(found))
    if not absolute:
        try:
            return p.relative_to(os.path.abspath(csv_dir)).as_posix()
        except ValueError:
            pass
    return str(p)


def _regions(table: LabelTable, chosen, imgs: pd.DataFrame, path_of: dict, skipped: Counter) -> pd.DataFrame | None:
    if table.boxes is None:
        return None
    b = table.boxes
    b = b[b["study_id"].isin(path_of.keys())]
    keep = np.array([chosen.get(f, {}).get(s) == "pos" for s, f in zip(b["study_id"], b["finding"], strict=True)],
                    dtype=bool)
    neg = np.array([chosen.get(f, {}).get(s) == "neg" for s, f in zip(b["study_id"], b["finding"], strict=True)],
                   dtype=bool)
    if neg.any():
        skipped["box on a study sampled as negative for its finding (not written)"] += int(neg.sum())
    b = b[keep].copy()
    b["image_path"] = b["study_id"].map(path_of)
    if table.dataset == "vindr" and len(b):
        sizes = {s: _dicom_size(Path(imgs.at[s, "found"])) if _is_path(imgs.at[s, "found"]) else (np.nan, np.nan)
                 for s in pd.unique(b["study_id"])}
        b["image_width"] = b["study_id"].map(lambda s: sizes[s][0])
        b["image_height"] = b["study_id"].map(lambda s: sizes[s][1])
    return b[list(REGION_COLUMNS)].reset_index(drop=True)


def _out_paths(out) -> dict[str, Path]:
    csv_path = Path(out).expanduser()
    if csv_path.suffix.lower() != ".csv":
        raise ValueError(f"{csv_path}: --out must name a .csv file")
    stem = csv_path.with_suffix("")
    return {"csv": csv_path, "regions": Path(f"{stem}_regions.csv"), "build": Path(f"{stem}.build.json")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(result: BuildResult, paths: dict[str, Path]) -> None:
    try:
        _write_files(result, paths)
    except OSError as e:  # a parent that is a file, a read-only folder: the user's to fix
        raise ValueError(f"{e.filename or paths['csv']}: cannot write --out ({e.strerror or e})") from None


def _write_files(result: BuildResult, paths: dict[str, Path]) -> None:
    paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    result.rows.to_csv(paths["csv"], index=False)
    written = {"csv": str(paths["csv"])}
    if result.regions is not None:
        result.regions.to_csv(paths["regions"], index=False)
        written["regions"] = str(paths["regions"])
    written["build"] = str(paths["build"])
    result.provenance["written"] = written
    paths["build"].write_text(json.dumps(result.provenance, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLI


def _ratio(text: str) -> float | None:
    if text.strip().lower() == "all":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line and exit code 2 (argparse's default prints the whole usage first)."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m medvlm.data.questions", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a question CSV from a data set's label file")
    b.add_argument("--dataset", required=True, help=" | ".join(DATASETS))
    b.add_argument("--labels", required=True, help="the data set's label file as distributed")
    b.add_argument("--images", help="folder holding the images; images not there are skipped and counted")
    b.add_argument("--findings", nargs="+", required=True, help="canonical names, the data set's labels or synonyms")
    b.add_argument("--n_studies", type=int, help="studies per finding (default: every positive)")
    b.add_argument("--negatives_per_positive", type=_ratio, default=1.0, help="a number, or 'all' (default 1)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--views", nargs="+", help=f"allowed views, preferred first (default {' '.join(DEFAULT_VIEWS)})")
    b.add_argument("--uncertain", choices=UNCERTAIN, default="ignore", help="CheXpert/MIMIC -1 labels")
    b.add_argument("--blank", choices=BLANK, default="negative", help="CheXpert/MIMIC blank (not mentioned) labels")
    b.add_argument("--vindr_rule", choices=VINDR_RULES, default="majority")
    b.add_argument("--metadata", help="MIMIC-CXR-JPG mimic-cxr-2.0.0-metadata.csv (default: beside --labels)")
    b.add_argument("--boxes", help="NIH BBox_List_2017.csv (default: beside --labels)")
    b.add_argument("--include_negations", action="store_true", help="variants 3-5 negated; adds the polarity column")
    b.add_argument("--finding_map", help="label,finding CSV or JSON overriding the packaged finding map")
    b.add_argument("--absolute_paths", action="store_true", help="write absolute image paths")
    b.add_argument("--out", required=True, help="the question CSV to write")
    b.add_argument("--overwrite", action="store_true")
    ls = sub.add_parser("findings", help="list the findings a data set can ask about")
    ls.add_argument("--dataset", required=True, help=" | ".join(DATASETS))
    a = p.parse_args(argv)
    try:
        if a.command == "findings":
            fmap = load_finding_map()
            if a.dataset not in DATASETS:
                raise ValueError(f"unknown dataset {a.dataset!r}; choose one of {', '.join(DATASETS)}")
            for f in fmap.dataset_findings(a.dataset):
                print(f"{f:28s} {' | '.join(fmap.dataset_labels(f, a.dataset))}")
            return 0
        result = build_questions(
            a.dataset, a.labels, a.findings, images=a.images, n_studies=a.n_studies,
            negatives_per_positive=a.negatives_per_positive, seed=a.seed, views=a.views, uncertain=a.uncertain,
            blank=a.blank, vindr_rule=a.vindr_rule, metadata=a.metadata, boxes=a.boxes,
            include_negations=a.include_negations, finding_map=a.finding_map, out=a.out, overwrite=a.overwrite,
            absolute_paths=a.absolute_paths)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"wrote {', '.join(result.provenance['written'].values())}")
    if a.images is None:
        print("image paths are relative to the data set's root: run with --image_root <that folder>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
