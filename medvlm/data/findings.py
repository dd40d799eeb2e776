"""Canonical finding names and each public data set's labels for them.

The map is package data (``medvlm/data/resources/findings.json``), not code: per canonical finding
(snake_case, e.g. ``pleural_effusion``) the phrase questions use (``term``) and its
synonyms; per data set (``nih``, ``nih-google2019``, ``chexpert``, ``mimic-cxr``, ``vindr``,
``rsna``, ``siim``) each label as the data set spells it and the finding it means. The
question builder (:mod:`medvlm.data.questions`), the question bank and the region parsers
(``--finding_map``) all read this one map.

    python -c "from medvlm.data.findings import canonical_finding as c; print(c('Effusion', 'nih'))"
    python -c "from medvlm.data.findings import load_finding_map as m; print(m().findings)"
    python -c "from medvlm.data.findings import dataset_labels as d; print(d('nodule_mass', 'nih'))"

Names are compared case-, space-, underscore- and punctuation-insensitively
("Pleural_Thickening", "pleural thickening" and "PLEURAL-THICKENING" are the same key).
:func:`canonical_finding` accepts a canonical name, a data set's label, the finding's term or a
listed synonym, and returns None for a label deliberately left unmapped (VinDr "Other
lesion") or unknown. Overrides (a dict, or a CSV ``label,finding[,dataset]`` / JSON
``{label: finding}`` file) take precedence; an empty finding unmaps a label; an override may
name a finding that is not in the packaged map (a custom CSV's own finding), in snake_case.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent / "resources"
FINDINGS_FILE = RESOURCES / "findings.json"

_NAME_RE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize(label: str) -> str:
    """Comparison key: lower case, every run of non-alphanumerics one space, trimmed."""
    return _NON_ALNUM.sub(" ", str(label).lower()).strip()


@dataclass(frozen=True)
class FindingInfo:
    """name: canonical snake_case name; term: the phrase questions use; synonyms: other
    phrases naming it; note: a caveat about what the label means, if any."""

    name: str
    term: str
    synonyms: tuple[str, ...] = ()
    note: str | None = None

    @property
    def phrases(self) -> tuple[str, ...]:
        """The term, then the synonyms."""
        return (self.term, *self.synonyms)


@dataclass(frozen=True)
class DatasetInfo:
    """key: data set key; name: its full name; labels: {label as spelled: finding};
    any_of: {finding: labels, positive when any is}; unmapped: labels with no finding."""

    key: str
    name: str
    labels: Mapping[str, str]
    any_of: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unmapped: tuple[str, ...] = ()
    label_file: str = ""
    note: str | None = None


class FindingMap:
    """Finding names and data set labels, with optional overrides (see the module docstring)."""

    def __init__(self, findings: Mapping[str, FindingInfo], datasets: Mapping[str, DatasetInfo],
                 overrides: Mapping[tuple[str | None, str], str | None] | None = None,
                 source: str = str(FINDINGS_FILE)):
        self.findings = dict(findings)
        self.datasets = dict(datasets)
        self.source = source
        # overrides keyed (dataset or None, normalized label) -> (label as written, finding or None)
        self.overrides = dict(overrides or {})
        for (scope, _), (label, _f) in self.overrides.items():
            if scope is not None and scope not in self.datasets:
                raise ValueError(f"finding map override {label!r}: unknown data set {scope!r}; "
                                 f"known: {', '.join(self.datasets)}")
        self._by_name = {normalize(n): n for n in self.findings}
        for _label, target in self.overrides.values():
            if target is not None:
                self._by_name.setdefault(normalize(target), target)
        self._by_phrase: dict[str, str] = {}
        for info in self.findings.values():
            for phrase in info.phrases:
                key = normalize(phrase)
                other = self._by_phrase.get(key)
                if other is not None and other != info.name:
                    raise ValueError(f"{source}: phrase {phrase!r} names both {other!r} and {info.name!r}")
                self._by_phrase[key] = info.name
        self._by_label: dict[str, dict[str, str | None]] = {}
        for ds in self.datasets.values():
            table: dict[str, str | None] = {}
            for label, finding in ds.labels.items():
                if finding not in self.findings:
                    raise ValueError(f"{source}: data set {ds.key!r} maps {label!r} to unknown finding {finding!r}")
                table[normalize(label)] = finding
            for finding in ds.any_of:
                if finding not in self.findings:
                    raise ValueError(f"{source}: data set {ds.key!r} any_of names unknown finding {finding!r}")
            for label in ds.unmapped:
                table[normalize(label)] = None
            self._by_label[ds.key] = table

    # ------------------------------------------------------------------ look-ups

    def _check_dataset(self, dataset: str | None) -> str | None:
        if dataset is None:
            return None
        key = str(dataset).strip().lower()
        if key not in self.datasets:
            raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(self.datasets)}")
        return key

    def canonical_finding(self, label: str, dataset: str | None = None) -> str | None:
        """The canonical finding ``label`` means (in ``dataset`` when given), or None.

        Order: overrides (for the data set, then for any), the data set's own labels, canonical
        names, terms and synonyms, then other data sets' labels when they all agree.
        """
        ds = self._check_dataset(dataset)
        key = normalize(label)
        if not key:
            return None
        for scope in ((ds, None) if ds is not None else (None,)):
            if (scope, key) in self.overrides:
                return self.overrides[(scope, key)][1]
        if ds is not None and key in self._by_label[ds]:
            return self._by_label[ds][key]
        if key in self._by_name:
            return self._by_name[key]
        if key in self._by_phrase:
            return self._by_phrase[key]
        hits = {t[key] for t in self._by_label.values() if key in t and t[key] is not None}
        return hits.pop() if len(hits) == 1 else None

    def require(self, name: str) -> str:
        """The canonical finding for ``name``; ValueError listing the known ones if none."""
        found = self.canonical_finding(name)
        if found is None:
            raise ValueError(f"unknown finding {name!r}; known: {', '.join(sorted(self.findings))}")
        return found

    def dataset_labels(self, finding: str, dataset: str) -> list[str]:
        """The data set's labels (as spelled there) that make ``finding`` positive (any of them)."""
        ds = self._check_dataset(dataset)
        name = self.require(finding)
        info = self.datasets[ds]  # type: ignore[index]
        # direct labels unless an override sends them elsewhere; any_of labels (composites) as listed
        out = [lab for lab, f in info.labels.items() if f == name and self.canonical_finding(lab, ds) == name]
        for lab in info.any_of.get(name, ()):
            if lab not in out:
                out.append(lab)
        for (scope, key), (label, target) in self.overrides.items():
            if scope in (None, ds) and target == name and not any(normalize(o) == key for o in out):
                out.append(label)
        return out

    def dataset_findings(self, dataset: str) -> list[str]:
        """Every canonical finding the data set has a label for, sorted."""
        ds = self._check_dataset(dataset)
        info = self.datasets[ds]  # type: ignore[index]
        return sorted({*info.labels.values(), *info.any_of})

    def info(self, finding: str) -> FindingInfo:
        name = self.canonical_finding(finding)
        if name is None:
            raise ValueError(f"unknown finding {finding!r}; known: {', '.join(sorted(self.findings))}")
        if name not in self.findings:  # an override's custom finding
            return FindingInfo(name, name.replace("_", " "))
        return self.findings[name]

    def finding_term(self, finding: str) -> str:
        """The phrase questions use for the finding (e.g. "pleural effusion")."""
        return self.info(finding).term

    def synonyms(self, finding: str) -> list[str]:
        return list(self.info(finding).synonyms)

    def phrases(self, finding: str) -> tuple[str, ...]:
        """The finding's term and synonyms; for a finding outside the map (a custom CSV's own,
        e.g. ``modality_cr``), its name with underscores as spaces. Never raises."""
        known = self.canonical_finding(finding) if str(finding).strip() else None
        if known is not None:
            return self.info(known).phrases
        return (str(finding).replace("_", " ").strip(),)

    def find_phrase(self, question: str, finding: str) -> tuple[int, int] | None:
        """Character span of the finding's term or a synonym in ``question`` (case-insensitive,
        whole words; the longest phrase that occurs, earliest on ties), or None. What ``--query_mode
        finding`` needs to locate lay wordings such as "fluid around the lung"; a finding outside
        the map is looked for by its own name (see :meth:`phrases`)."""
        text = question.lower()
        best: tuple[int, int] | None = None
        phrases = sorted((p for p in self.phrases(finding) if p), key=len, reverse=True)
        for phrase in phrases:
            at = _find_word(text, phrase.lower())
            if at >= 0 and (best is None or len(phrase) > best[1] - best[0] or
                            (len(phrase) == best[1] - best[0] and at < best[0])):
                best = (at, at + len(phrase))
        return best

    def with_overrides(self, overrides: Mapping[str, str | None] | str | os.PathLike[str]) -> FindingMap:
        """A copy with ``overrides`` (dict {label: finding}, or a CSV / JSON file) on top."""
        merged = dict(self.overrides)
        merged.update(_read_overrides(overrides))
        return FindingMap(self.findings, self.datasets, merged, self.source)


def _find_word(text: str, phrase: str) -> int:
    """First index of ``phrase`` in ``text`` at word boundaries, or -1."""
    m = re.search(r"(?<![0-9a-z])" + re.escape(phrase) + r"(?![0-9a-z])", text)
    return m.start() if m else -1


def _check_target(finding: str | None, where: str) -> str | None:
    if finding is None:
        return None
    text = str(finding).strip()
    if not text:
        return None
    if not _NAME_RE.match(text):
        raise ValueError(f"{where}: finding {text!r} is not a snake_case name (a-z, 0-9, _)")
    return text


def _read_overrides(overrides) -> dict[tuple[str | None, str], tuple[str, str | None]]:
    """{(dataset or None, normalized label): (label, finding or None)} from a dict, CSV or JSON file."""
    out: dict[tuple[str | None, str], str | None] = {}
    if isinstance(overrides, Mapping):
        for label, finding in overrides.items():
            out[(None, normalize(label))] = (str(label), _check_target(finding, f"finding map override {label!r}"))
        return out
    path = Path(overrides).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: finding map file not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON object of label -> finding ({e})") from e
        if not isinstance(data, dict) or not all(isinstance(v, str | type(None)) for v in data.values()):
            raise ValueError(f"{path}: must be a JSON object mapping label -> finding (string)")
        for label, finding in data.items():
            out[(None, normalize(label))] = (label, _check_target(finding, f"{path}: label {label!r}"))
        return out
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read as a CSV file ({e})") from e
    if not rows:
        raise ValueError(f"{path}: empty finding map file (need a header label,finding[,dataset])")
    header = [h.strip().lower() for h in rows[0]]
    if "label" not in header or "finding" not in header:
        raise ValueError(f"{path}:1: header must have columns label,finding (optional dataset); got {rows[0]}")
    il, jf = header.index("label"), header.index("finding")
    kd = header.index("dataset") if "dataset" in header else None
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{n}: has {len(row)} field(s), the header has {len(header)}")
        label = row[il].strip()
        if not label:
            raise ValueError(f"{path}:{n}: empty label")
        scope = (row[kd].strip().lower() or None) if kd is not None else None
        out[(scope, normalize(label))] = (label, _check_target(row[jf], f"{path}:{n}"))
    return out


def _parse(data: dict, source: str) -> FindingMap:
    try:
        findings = {
            name: FindingInfo(name, spec["term"], tuple(spec.get("synonyms", ())), spec.get("note"))
            for name, spec in data["findings"].items()
        }
        datasets = {
            key: DatasetInfo(key, spec["name"], dict(spec["labels"]),
                             {f: tuple(v) for f, v in spec.get("any_of", {}).items()},
                             tuple(spec.get("unmapped", ())), spec.get("label_file", ""), spec.get("note"))
            for key, spec in data["datasets"].items()
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: malformed finding map ({type(e).__name__}: {e})") from e
    for name in findings:
        if not _NAME_RE.match(name):
            raise ValueError(f"{source}: finding {name!r} is not a snake_case name")
    return FindingMap(findings, datasets, source=source)


@lru_cache(maxsize=1)
def _packaged() -> FindingMap:
    return _parse(json.loads(FINDINGS_FILE.read_text(encoding="utf-8")), str(FINDINGS_FILE))


def load_finding_map(overrides: Mapping[str, str | None] | str | os.PathLike[str] | None = None) -> FindingMap:
    """The packaged map, with ``overrides`` (dict, or CSV ``label,finding[,dataset]`` / JSON file) on top."""
    base = _packaged()
    return base if overrides is None else base.with_overrides(overrides)


def canonical_finding(label: str, dataset: str | None = None) -> str | None:
    return _packaged().canonical_finding(label, dataset)


def dataset_labels(finding: str, dataset: str) -> list[str]:
    return _packaged().dataset_labels(finding, dataset)


def finding_term(finding: str) -> str:
    return _packaged().finding_term(finding)


def synonyms(finding: str) -> list[str]:
    return _packaged().synonyms(finding)


def find_phrase(question: str, finding: str) -> tuple[int, int] | None:
    return _packaged().find_phrase(question, finding)


def finding_phrases(finding: str) -> tuple[str, ...]:
    return _packaged().phrases(finding)


def torchxrayvision_data_file(name: str) -> Path | None:
    """Path of ``name`` in the installed torchxrayvision wheel's data folder, or None when the
    package or the file is absent (located with importlib, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / name
        if path.is_file():
            return path
    return None
